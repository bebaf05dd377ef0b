"""Vocab-parallel losses (TP = 2 and 4 gloo processes) equal the single-process ones, value and gradient.

One process group per world size runs every case (spawning costs far more than a case); each rank
gets its vocabulary slice of the same seeded logits, and the gradient slices are put back together.
"""

from __future__ import annotations

import pytest
import torch

from megatron_subnet.parallel import losses
from megatron_subnet.parallel.losses import cross_entropy, distillation_loss
from tests.distributed import run_distributed

VOCAB, SHAPE, CHUNK_TOKENS = 40, (2, 6), 5  # 12 tokens in chunks of 5, 5 and 2


def _cases() -> list[dict]:
    cases = [dict(fn="ce", reduction="mean", seed=1), dict(fn="ce", reduction="sum", seed=2)]
    variants = [("forward_kl", 64), ("reverse_kl", 64), ("topk_kl", 7), ("topk_kl", 25), ("topk_kl", 64)]
    for i, (kind, topk) in enumerate(variants):
        for temperature in (1.0, 2.0):
            for alpha in (0.5, 1.0):
                cases.append(dict(fn="kd", kind=kind, topk=topk, temperature=temperature, alpha=alpha, seed=10 + i))
    for temperature in (1.0, 2.0):
        cases.append(dict(fn="kd", kind="forward_kl", topk=64, temperature=temperature, alpha=0.0, seed=20))
    cases.append(dict(fn="kd", kind="forward_kl", topk=64, temperature=1.0, alpha=0.5, seed=21, teacher=False))
    return cases


def _inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(case["seed"])
    student = 3 * torch.randn(*SHAPE, VOCAB, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(*SHAPE, VOCAB, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, SHAPE, generator=g)
    return student, labels, teacher if case.get("teacher", True) else None


def _run(case: dict, student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None):
    """(loss values, gradient w.r.t. ``student``) of one case, on whatever slice this process holds."""
    student = student.clone().requires_grad_()
    if case["fn"] == "ce":
        loss = cross_entropy(student, labels, reduction=case["reduction"])
        values = [loss]
    else:
        loss, ce, kl = distillation_loss(
            student, labels, teacher, case["alpha"], case["kind"], case["temperature"], case["topk"]
        )
        values = [loss, ce] + ([] if kl is None else [kl])
    (grad,) = torch.autograd.grad(loss, student)
    return [v.detach() for v in values], grad


def _tp_losses(rank: int, world: int, cases: list[dict]) -> list:
    """Every case on this rank's vocabulary slice (tensor-parallel group of ``world``)."""
    local = VOCAB // world
    losses._CHUNK_ELEMENTS_BY_DEVICE = {"cpu": CHUNK_TOKENS * local}  # several token chunks per call
    results = []
    for case in cases:
        student, labels, teacher = _inputs(case)
        piece = slice(rank * local, (rank + 1) * local)
        results.append(_run(case, student[..., piece], labels, None if teacher is None else teacher[..., piece]))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_losses_match_single_process(world):
    cases = _cases()
    ranks = run_distributed(_tp_losses, world, tensor_parallel=world, args=(world, cases))
    for i, case in enumerate(cases):
        values, grad = _run(case, *_inputs(case))
        for r in range(world):  # every rank reports the same values, bit for bit
            assert [v.item() for v in ranks[r][i][0]] == [v.item() for v in ranks[0][i][0]], (case, r)
        tp_grad = torch.cat([ranks[r][i][1] for r in range(world)], dim=-1)
        assert len(ranks[0][i][0]) == len(values), case
        # the kernels compute in fp32 whatever the input dtype: a few fp32 ulps apart (in fp64 math, ~1e-15)
        for tp_value, value in zip(ranks[0][i][0], values):
            torch.testing.assert_close(tp_value.double(), value.double(), rtol=1e-6, atol=1e-6, msg=str(case))
        torch.testing.assert_close(tp_grad, grad, rtol=1e-5, atol=1e-7, msg=str(case))
