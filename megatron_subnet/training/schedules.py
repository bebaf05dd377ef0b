"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay (WSD)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the iteration (0-based index of the step being taken)."""

    lr: float
    min_lr: float
    warmup_iters: int
    train_iters: int
    style: str = "cosine"
    wsd_decay_iters: int = 0

    def __call__(self, iteration: int) -> float:
        if iteration < self.warmup_iters:
            return self.lr * (iteration + 1) / self.warmup_iters
        if self.style == "constant":
            return self.lr
        if self.style == "wsd":
            decay_start = self.train_iters - self.wsd_decay_iters
            if iteration < decay_start:
                return self.lr
            progress = (iteration - decay_start + 1) / self.wsd_decay_iters
            return self.lr - (self.lr - self.min_lr) * min(progress, 1.0)
        span = max(self.train_iters - self.warmup_iters, 1)
        progress = min((iteration - self.warmup_iters) / span, 1.0)
        if self.style == "linear":
            return self.lr - (self.lr - self.min_lr) * progress
        if self.style == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr decay style {self.style!r}")


def schedule_from_args(args: dict, train_iters: int) -> LRSchedule:
    """The schedule the flags in ``args`` (``vars(args)`` or a checkpoint's saved copy) give ``train_iters``."""
    return LRSchedule(
        args["lr"], args["min_lr"], args["lr_warmup_iters"], train_iters, args["lr_decay_style"],
        args.get("lr_wsd_decay_iters") or 0,
    )  # fmt: skip
