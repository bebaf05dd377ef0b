"""Language-model and distillation losses on full-vocabulary logits (fp32 math, mean over tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KD_LOSSES = ("forward_kl", "reverse_kl", "topk_kl")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``logits [b, s, v]``, ``labels [b, s]``."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    topk: int = 64,
) -> torch.Tensor:
    """KL divergence between temperature-softened teacher and student distributions, mean over tokens.

    ``forward_kl`` is KL(teacher || student), ``reverse_kl`` is KL(student || teacher), ``topk_kl`` is the
    forward KL with both distributions renormalised over the teacher's ``topk`` most likely tokens.
    The caller scales by ``temperature ** 2``.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    if kind == "topk_kl":
        values, index = t.topk(min(topk, t.shape[-1]), dim=-1)
        t, s = values, s.gather(-1, index)
    elif kind not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"kd loss {kind!r}: expected one of {', '.join(KD_LOSSES)}")
    log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if kind == "reverse_kl":
        per_token = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    else:
        per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return per_token.mean()


class _DistillationLoss(torch.autograd.Function):
    """``(1 - alpha) * CE + alpha * T^2 * KL`` with a hand-written gradient.

    One log-softmax of the student serves both terms, and the backward pass writes the gradient
    (``(1 - alpha) * (q - onehot) + alpha * T * dKL/dz``) in a few passes over the vocabulary instead of
    autograd's chain through log-softmax and kl_div. ``kd_loss`` and ``cross_entropy`` are the reference.
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, alpha, kind, temperature, topk):
        s = logits.detach().float().flatten(0, -2)
        t = teacher_logits.detach().float().flatten(0, -2)
        y = labels.flatten()
        n, T = s.shape[0], temperature
        log_q = torch.log_softmax(s, dim=-1)
        ce = -log_q.gather(1, y[:, None]).sum() / n
        if kind == "topk_kl":
            index = t.topk(min(topk, t.shape[-1]), dim=-1).indices
            log_qt = torch.log_softmax(s.gather(1, index) / T, dim=-1)
            log_p = torch.log_softmax(t.gather(1, index) / T, dim=-1)
        elif kind in ("forward_kl", "reverse_kl"):
            index = None
            log_qt = log_q if T == 1.0 else torch.log_softmax(s / T, dim=-1)
            log_p = torch.log_softmax(t / T, dim=-1)
        else:
            raise ValueError(f"kd loss {kind!r}: expected one of {', '.join(KD_LOSSES)}")
        del s, t
        if kind == "reverse_kl":
            per_token = (log_qt.exp() * (log_qt - log_p)).sum(-1)
        else:
            per_token = (log_p.exp() * (log_p - log_qt)).sum(-1)
        kl = per_token.sum() / n
        loss = (1.0 - alpha) * ce + alpha * T * T * kl
        ctx.save_for_backward(log_q, log_qt, log_p, y, per_token, index)
        ctx.settings = (alpha, kind, T, n, logits.dtype, logits.shape)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        log_q, log_qt, log_p, y, per_token, index = ctx.saved_tensors
        alpha, kind, T, n, dtype, shape = ctx.settings
        grad = log_q.exp()  # q, becomes the gradient in place
        if kind == "forward_kl" and T == 1.0:
            grad.sub_(log_p.exp(), alpha=alpha)  # (1 - a) q + a (q - p)
        else:
            grad.mul_(1.0 - alpha)
            if kind == "forward_kl":
                dkl = log_qt.exp().sub_(log_p.exp())
            elif kind == "reverse_kl":
                qt = log_qt.exp()
                dkl = qt.mul_((log_qt - log_p).sub_(per_token[:, None]))
            else:
                dkl = log_qt.exp().sub_(log_p.exp())
            if index is None:
                grad.add_(dkl, alpha=alpha * T)
            else:
                grad.scatter_add_(1, index, dkl.mul_(alpha * T))
        grad[torch.arange(n, device=grad.device), y] -= 1.0 - alpha
        grad.mul_(grad_loss / n)
        return grad.view(shape).to(dtype), None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    alpha: float,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    topk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(1 - alpha) * CE + alpha * T^2 * KL``; returns (loss, CE, KL or None)."""
    if teacher_logits is None or alpha == 0.0:
        ce = cross_entropy(student_logits, labels)
        return ce, ce, None
    return _DistillationLoss.apply(student_logits, labels, teacher_logits, alpha, kind, temperature, topk)
