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
    ce = cross_entropy(student_logits, labels)
    if teacher_logits is None or alpha == 0.0:
        return ce, ce, None
    kl = kd_loss(student_logits, teacher_logits, kind, temperature, topk)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl, ce, kl
