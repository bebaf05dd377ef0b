"""CUDA's device rules on the CPU (``tests/devices.py``): extraction, the masked forward and the fused losses
run on weights that live on another device than the default, with no operation mixing devices and no host
sync (``.item()`` of a meta tensor raises)."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from megatron_subnet.model.extract import extract_state_dict
from megatron_subnet.parallel.losses import KD_LOSSES, distillation_loss
from tests.devices import MixedDevices, one_device
from tests.test_subnet import PARENTS, make_parent, random_subnet, tokens
from tests.tiny_models import tiny


@pytest.mark.parametrize("name", list(PARENTS))
def test_extraction_selects_on_the_weights_device(name):
    """Index tensors made on the CPU select from weights on another device (CUDA: "indices must be on the
    current device"); the student's tensors stay on the weights' device, shaped as the CPU extraction's."""
    parent = make_parent(name)
    rng = random.Random(3)
    for _ in range(5):
        subnet = random_subnet(parent.config, rng)
        _, expected = extract_state_dict(parent.config, parent.state_dict(), subnet)
        on_meta = {k: v.to("meta") for k, v in parent.state_dict().items()}
        with one_device():
            _, got = extract_state_dict(parent.config, on_meta, subnet)
        assert {k: (v.shape, v.device.type) for k, v in got.items()} == {
            k: (v.shape, "meta") for k, v in expected.items()
        }


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("name", list(PARENTS))
def test_masked_training_step_keeps_to_one_device(name, kind):
    """Forward of a masked sub-network, the fused distillation loss and the backward on meta weights."""
    parent = make_parent(name).to("meta").train()
    subnet = random_subnet(parent.config, random.Random(5))
    x = tokens().to("meta")
    with one_device():
        logits = parent(x, subnet=subnet)
        loss, _, _ = distillation_loss(logits, x, logits.detach() * 2, 0.5, kind, 2.0, 4)
        loss.backward()
    assert parent.embedding.weight.grad.device.type == "meta"


def test_the_check_catches_mixed_devices():
    with pytest.raises(MixedDevices, match="index_select"), one_device():
        torch.zeros(4, 3, device="meta").index_select(0, torch.tensor([0, 2]))
    with one_device():  # a CPU scalar beside a device tensor is allowed, as on CUDA
        torch.zeros(2, device="meta").add(torch.tensor(1.0))


def _train_step_host_reads(rank: int, zero_stage: int) -> tuple[list[str], bool]:
    """The host reads of our code in the second step of a tiny ZeRO run with distillation, 2 micro-batches."""
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.training.engine import KDConfig, Teacher, build_optimizer, initialize_student, train_step
    from tests.devices import host_reads

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's engine asks for it (a launcher's variable)
    config = ModelConfig(**tiny(
        "llama", vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
        head_dim=8, ffn_hidden_size=64, tie_word_embeddings=True,
    ))
    torch.manual_seed(0)
    student = GPTModel(config)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "train_batch_size": 2,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": zero_stage},
                 "zero_allow_untested_optimizer": True}  # fmt: skip
    engine = initialize_student(student, build_optimizer(student, 1e-3, 0.1, (0.9, 0.95), 1e-8), ds_config)
    teacher = Teacher(GPTModel(config), ds_config, "cpu")
    batches = [torch.randint(0, 64, (1, 9)) for _ in range(2)]
    train_step(engine, teacher, batches, 1e-3, KDConfig())
    with host_reads() as reads:
        result = train_step(engine, teacher, batches, 1e-3, KDConfig())
    return reads.sites, math.isfinite(result.loss) and not result.skipped


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_training_step_reads_the_device_once(zero_stage):
    """Losses, CE and KD parts, gradient norm and the skip decision come to the host together at the end of
    the step; nothing of ours waits on the device in between (DeepSpeed's own reads are DeepSpeed's)."""
    from tests.distributed import run_distributed

    [(sites, trained)] = run_distributed(_train_step_host_reads, 1, args=(zero_stage,), timeout=300)
    assert trained and len(sites) == 1, sites


def test_guarded_adamw_skips_on_the_device():
    """A non-finite gradient skips the update and its step count through the fused kernel's ``found_inf``;
    ``skipped`` stays set over every call until reset (ZeRO-3 calls once per sub-group); an unfused AdamW,
    which ignores ``found_inf``, is refused."""
    from megatron_subnet.training.engine import GuardedAdamW

    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1, fused=True)
    nan = torch.tensor([1.0, float("nan"), 1.0])
    for grad, changes, step_count in ((torch.ones(3), True, 1), (nan, False, 1), (torch.ones(3), True, 2)):
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        assert (not torch.equal(p, before)) == changes and torch.isfinite(p).all()
        assert float(opt.state[p]["step"]) == step_count
    assert opt.skipped.item() == 1.0  # the NaN call since the last reset
    opt.skipped = None
    p.grad = torch.ones(3)
    opt.step()
    assert opt.skipped.item() == 0.0
    with pytest.raises(ValueError, match="fused=True"):
        GuardedAdamW([p], fused=False)
