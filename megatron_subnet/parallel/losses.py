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


# Tokens per chunk of the fused loss: about 8 MB of fp32 logits, so a chunk's temporaries stay in cache.
_CHUNK_ELEMENTS = 1 << 21


class _DistillationLoss(torch.autograd.Function):
    """``(1 - alpha) * CE + alpha * T^2 * KL`` (CE alone without teacher logits), whose gradient is written
    during the forward pass.

    The vocabulary is walked in token chunks: one log-softmax of the student serves both terms, and
    ``(1 - alpha) * (q - onehot) + alpha * T * dKL/dz`` goes straight into one saved gradient buffer, so
    no full-size intermediate outlives its chunk. ``kd_loss`` and ``cross_entropy`` are the reference.
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, alpha, kind, temperature, topk):
        if kind not in KD_LOSSES:
            raise ValueError(f"kd loss {kind!r}: expected one of {', '.join(KD_LOSSES)}")
        s = logits.detach().flatten(0, -2)
        t = None if teacher_logits is None else teacher_logits.detach().flatten(0, -2)
        y = labels.flatten()
        n, vocab = s.shape
        T = temperature
        grad = torch.empty((n, vocab), dtype=torch.float32, device=s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            s_c, y_c, g = s[rows].float(), y[rows], grad[rows]
            log_q = torch.log_softmax(s_c, dim=-1)
            ce_sum += -log_q.gather(1, y_c[:, None]).sum()
            torch.exp(log_q, out=g)
            g[torch.arange(g.shape[0], device=g.device), y_c] -= 1.0
            if t is None:
                continue  # plain cross-entropy: q - onehot
            t_c = t[rows].float()
            if kind == "topk_kl":
                index = t_c.topk(min(topk, vocab), dim=-1).indices
                log_qt = torch.log_softmax(s_c.gather(1, index) / T, dim=-1)
                log_p = torch.log_softmax(t_c.gather(1, index) / T, dim=-1)
            else:
                index = None
                log_qt = log_q if T == 1.0 else torch.log_softmax(s_c / T, dim=-1)
                log_p = torch.log_softmax(t_c / T, dim=-1)
            if kind == "reverse_kl":
                qt = log_qt.exp()
                log_ratio = log_qt - log_p
                per_token = (qt * log_ratio).sum(-1)
                dkl = qt.mul_(log_ratio.sub_(per_token[:, None]))
            else:
                p = log_p.exp()
                per_token = (p * (log_p - log_qt)).sum(-1)
                dkl = (log_qt.exp() if log_qt is not log_q else torch.exp(log_q)).sub_(p)
            kl_sum += per_token.sum()
            g.mul_(1.0 - alpha)  # (1 - a)(q - onehot) + a T dKL/dz
            if index is None:
                g.add_(dkl, alpha=alpha * T)
            else:
                g.scatter_add_(1, index, dkl.mul_(alpha * T))
        ce, kl = (ce_sum / n).float(), (kl_sum / n).float()
        loss = (1.0 - alpha) * ce + alpha * T * T * kl
        ctx.save_for_backward(grad)
        ctx.settings = (n, logits.dtype, logits.shape)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if ctx.settings is None:
            raise RuntimeError("distillation_loss: a second backward pass through the same loss is not supported")
        (grad,) = ctx.saved_tensors
        n, dtype, shape = ctx.settings
        ctx.settings = None  # the buffer is scaled in place below
        return grad.mul_(grad_loss / n).view(shape).to(dtype), None, None, None, None, None, None


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
        loss, ce, _ = _DistillationLoss.apply(student_logits, labels, None, 0.0, kind, temperature, topk)
        return loss, ce, None
    return _DistillationLoss.apply(student_logits, labels, teacher_logits, alpha, kind, temperature, topk)
