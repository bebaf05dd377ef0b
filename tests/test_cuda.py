"""The same code on a CUDA device: fused CE/KD losses, masked == extracted sub-networks, FLOP counts and a
one-GPU training run under NCCL each equal (or track) their CPU results.

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
        s = student.to(device).requires_grad_()
        loss, ce, kl = distillation_loss(s, labels.to(device), teacher.to(device), 0.5, kind, 2.0, 16)
        loss.backward()
        results[device] = [loss.cpu(), ce.cpu(), kl.cpu(), s.grad.cpu()]
    for got, expected in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(PARENTS))
def test_masked_equals_extracted_on_cuda(name, dtype):
    parent = make_parent(name).to("cuda", dtype)
    rng = random.Random(7)
    x = tokens().cuda()
    for _ in range(10):
        subnet = random_subnet(parent.config, rng)
        student = student_from(parent, subnet).to("cuda", dtype)
        with torch.no_grad():
            masked, extracted = parent(x, subnet=subnet).float(), student(x).float()
        tolerance = 1e-4 if dtype == torch.float32 else masked.abs().max().item() * 2**-7
        assert (masked - extracted).abs().max().item() <= tolerance


def test_cuda_forward_equals_cpu():
    cpu = make_parent("llama_gqa_tied")
    gpu = GPTModel(cpu.config).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


def test_one_gpu_training_run_under_nccl(tmp_path):
    """pretrain_slm.py on one GPU (NCCL) with a bf16 teacher: 5 steps, finite losses, MFU against the GPU table."""
    from tests.training_utils import build_workspace, read_jsonl, run, torchrun_cmd

    ws = build_workspace(tmp_path / "ws")
    argv = [
        "--ds_config", str(ws / "zero1.json"), "--teacher-load", str(ws / "teacher"),
        "--subnet", str(ws / "subnet.json"),
        "--data-path", str(ws / "data"), "--split", "80,10,10", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--seq-length", "32", "--train-iters", "5", "--log-interval", "1", "--eval-interval", "5", "--eval-iters", "1",
        "--teacher-dtype", "bf16", "--log-dir", str(tmp_path / "log"),
    ]  # fmt: skip
    result = run(torchrun_cmd(1, argv), ws, timeout=300)
    assert result.returncode == 0, result.tail()
    records = [r for r in read_jsonl(tmp_path / "log" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 5 and all(0 < r["mfu"] < 1 and r["loss"] == r["loss"] for r in records)
