"""One distillation micro-batch through the pipeline stages, as the executor runs it: each stage runs its
layers of the student and of the frozen teacher, both hidden states travel to the next stage in one message
(the student's with a gradient back), and the last stage takes the loss. The trainer's step and the search's
distilled fitness both build their forward callback here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_subnet.parallel.losses import KD_LOSSES, distillation_loss
from megatron_subnet.parallel.pipeline import PipelineStage
from megatron_subnet.parallel.pipeline_executor import ForwardFn, Messages

Model = Callable[..., torch.Tensor]  # called as model(tokens or hidden states, chunk=c)


@dataclass(frozen=True)
class KDConfig:
    """The training objective: ``(1 - alpha) * CE + alpha * T^2 * KL`` (``alpha`` 0: CE alone, no teacher)."""

    alpha: float = 0.5
    kind: str = KD_LOSSES[0]
    temperature: float = 1.0
    topk: int = 64


def distillation_messages(
    batch: torch.Tensor, student: tuple[int, torch.dtype], teacher: tuple[int, torch.dtype] | None
) -> Messages:
    """What travels between stages for token ``batch`` ``[b, t + 1]``: the student's hidden states (hidden
    size, dtype) with a gradient back, then the teacher's."""
    b, t = batch.shape[0], batch.shape[1] - 1
    shapes = [((b, t, student[0]), student[1])] + ([((b, t, teacher[0]), teacher[1])] if teacher else [])
    return Messages(shapes, with_grad=1)


def distillation_forward(
    student: Model,
    stage: PipelineStage,
    teacher: Model | None,
    batches: list[torch.Tensor],
    kd: KDConfig,
    record: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
) -> ForwardFn:
    """The executor's forward callback for micro-batch ``i`` of ``batches`` on model chunk ``chunk``: the
    outputs to send on, or on the last stage the loss (``record(loss, ce, kl)`` sees its parts)."""

    def forward(chunk: int, i: int, received: list[torch.Tensor] | None):
        first = stage.holds_first(chunk)
        tokens, labels = batches[i][:, :-1], batches[i][:, 1:]
        with torch.no_grad():
            teacher_out = None if teacher is None else teacher(tokens if first else received[1], chunk=chunk)
        out = student(tokens if first else received[0], chunk=chunk)
        if not stage.holds_last(chunk):
            return [out] + ([] if teacher_out is None else [teacher_out])
        loss, ce, kl = distillation_loss(out, labels, teacher_out, kd.alpha, kd.kind, kd.temperature, kd.topk)
        if record is not None:
            record(loss, ce, kl)
        return loss

    return forward
