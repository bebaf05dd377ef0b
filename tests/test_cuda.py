"""The same code on a CUDA device, each test against the CPU: fused CE/KD losses, masked == extracted
sub-networks (extraction from CUDA weights), the forward, and a 5-step one-GPU training run under NCCL against
the same run on the CPU.

Skipped where ``torch.cuda.is_available()`` is false (CI has no GPU); ``benchmarks/gpu_check.sh`` runs it on
a GPU machine.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.parallel.losses import distillation_loss
from tests.test_subnet import PARENTS, make_parent, random_subnet, student_from, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "topk_kl"])
def test_fused_loss_on_cuda_equals_cpu(kind):
    g = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(4, 64, 1000, generator=g)
    teacher = 3 * torch.randn(4, 64, 1000, generator=g)
    labels = torch.randint(0, 1000, (4, 64), generator=g)
    results = {}
    for device in ("cpu", "cuda"):
        s = student.detach().to(device).requires_grad_()  # a leaf on each device (its own .grad)
        loss, ce, kl = distillation_loss(s, labels.to(device), teacher.to(device), 0.5, kind, 2.0, 16)
        loss.backward()
        results[device] = [loss.cpu(), ce.cpu(), kl.cpu(), s.grad.cpu()]
    for got, expected in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(PARENTS))
def test_masked_equals_extracted_on_cuda(name, dtype):
    """Extraction from CUDA weights; masked == extracted on the GPU, and both track the CPU's masked logits in
    the same dtype (bf16: these large random weights amplify roundings to a few % of the largest logit; a
    wrong selection is off by about 100%)."""
    cpu = make_parent(name).to(dtype)
    parent = make_parent(name).to("cuda", dtype)
    rng = random.Random(7)
    x = tokens()
    for _ in range(10):
        subnet = random_subnet(parent.config, rng)
        student = student_from(parent, subnet).to("cuda", dtype)
        with torch.no_grad():
            reference = cpu(x, subnet=subnet).float()
            masked, extracted = parent(x.cuda(), subnet=subnet).float().cpu(), student(x.cuda()).float().cpu()
        scale = reference.abs().max().item()
        same, cpu_bound = (1e-4, 1e-4) if dtype == torch.float32 else (scale * 2**-7, scale * 2**-3)
        assert (masked - extracted).abs().max().item() <= same
        assert (masked - reference).abs().max().item() <= cpu_bound


def test_cuda_forward_equals_cpu():
    cpu = make_parent("llama_gqa_tied")
    gpu = GPTModel(cpu.config).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


def test_one_gpu_training_run_under_nccl_equals_cpu(tmp_path):
    """pretrain_slm.py on one GPU (NCCL) and on the CPU (gloo, no GPU visible), 5 steps with distillation: the
    same losses, CE and KD parts and validation loss (TF32 off: fp32 on both); MFU against the GPU table."""
    from tests.training_utils import build_workspace, read_jsonl, run, torchrun_cmd

    ws = build_workspace(tmp_path / "ws")
    records = {}
    for device, env in (("cuda", None), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
        log = tmp_path / f"log_{device}"
        argv = [
            "--ds_config", str(ws / "zero1.json"), "--teacher-load", str(ws / "teacher"),
            "--subnet", str(ws / "subnet.json"), "--data-path", str(ws / "data"), "--split", "80,10,10",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "32", "--train-iters", "5",
            "--log-interval", "1", "--eval-interval", "5", "--eval-iters", "1", "--log-dir", str(log),
        ]  # fmt: skip
        result = run(torchrun_cmd(1, argv), ws, env=env, timeout=300)
        assert result.returncode == 0, result.tail()
        records[device] = read_jsonl(log / "metrics.jsonl")
    steps = {d: [r for r in rows if "loss" in r] for d, rows in records.items()}
    assert len(steps["cuda"]) == len(steps["cpu"]) == 5
    assert all(0 < r["mfu"] < 1 for r in steps["cuda"])
    for got, expected in zip(steps["cuda"], steps["cpu"]):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-3), (got["iteration"], key)
    valid = {d: [r["valid_loss"] for r in rows if "valid_loss" in r] for d, rows in records.items()}
    assert len(valid["cuda"]) == 2 and valid["cuda"] == pytest.approx(valid["cpu"], rel=1e-3)
