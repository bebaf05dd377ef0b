"""The fused distillation loss equals the autograd reference (kd_loss + cross_entropy), value and gradient."""

from __future__ import annotations

import pytest
import torch

from megatron_subnet.parallel.losses import cross_entropy, distillation_loss, kd_loss


def reference(student, labels, teacher, alpha, kind, temperature, topk):
    ce = cross_entropy(student, labels)
    kl = kd_loss(student, teacher, kind, temperature, topk)
    return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "topk_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_fused_loss_matches_autograd(kind, temperature, alpha):
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 5, 37, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 37, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 37, (2, 5), generator=g)
    loss, ce, kl = distillation_loss(student, labels, teacher, alpha, kind, temperature, topk=7)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().clone().requires_grad_()
    ref_loss, ref_ce, ref_kl = reference(ref_student, labels, teacher, alpha, kind, temperature, 7)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_student)
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce.double(), ref_ce.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), ref_kl.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad.to(grad.dtype), rtol=1e-5, atol=1e-7)


def test_kd_is_zero_for_identical_logits_and_bf16_keeps_dtype():
    logits = torch.randn(3, 4, 50)
    labels = torch.randint(0, 50, (3, 4))
    for kind in ("forward_kl", "reverse_kl", "topk_kl"):
        _, _, kl = distillation_loss(logits, labels, logits.clone(), 1.0, kind, 2.0, 5)
        assert abs(kl.item()) < 1e-6
    student = logits.bfloat16().requires_grad_()
    loss, _, _ = distillation_loss(student, labels, logits.bfloat16(), 0.5)
    loss.backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad).all()


def test_alpha_zero_is_plain_cross_entropy():
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    for teacher in (torch.randn(2, 3, 11), None):
        loss, ce, kl = distillation_loss(logits, labels, teacher, 0.0)
        (grad,) = torch.autograd.grad(loss, logits)
        reference = cross_entropy(logits, labels)
        (ref_grad,) = torch.autograd.grad(reference, logits)
        assert kl is None
        torch.testing.assert_close(loss.double(), reference.double())
        torch.testing.assert_close(grad, ref_grad)


def test_cross_entropy_sum_is_token_weighted_mean():
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    total = cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(total, 6 * cross_entropy(logits, labels))
    (grad,) = torch.autograd.grad(total, logits)
    (ref_grad,) = torch.autograd.grad(6 * cross_entropy(logits, labels, reduction="mean"), logits)
    torch.testing.assert_close(grad, ref_grad)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="none")


def test_chunk_size_follows_the_device(monkeypatch):
    """A CPU chunk fits its cache (42 tokens of SmolLM2's 49,152 ids); an accelerator's is 32x larger. The
    fused loss is the same whatever the chunking: one chunk (the accelerator's size) or one token each."""
    from megatron_subnet.parallel import losses

    assert losses._chunk_rows(49152, torch.device("cpu")) == 42
    assert losses._chunk_rows(49152, torch.device("cuda")) == 1365
    assert losses._chunk_rows(10**9, torch.device("cuda")) == 1
    g = torch.Generator().manual_seed(1)
    student = 3 * torch.randn(2, 9, 37, generator=g)
    teacher, labels = 3 * torch.randn(2, 9, 37, generator=g), torch.randint(0, 37, (2, 9), generator=g)
    results = []
    for elements in ({}, {"cpu": 37}):  # the accelerator's size on the CPU: all 18 tokens at once; one per chunk
        monkeypatch.setattr(losses, "_CHUNK_ELEMENTS_BY_DEVICE", elements)
        s = student.clone().requires_grad_()
        loss, ce, kl = distillation_loss(s, labels, teacher, 0.5, "forward_kl", 2.0)
        loss.backward()
        results.append([loss, ce, kl, s.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
