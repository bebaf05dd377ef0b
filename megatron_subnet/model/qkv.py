"""The fused-QKV row layout, in one place: gpt.py, subnet.py, hf.py and tensor-parallel sharding all use it.

Rows of ``linear_qkv`` are grouped by query group. For each group ``g``: its ``per_group`` query heads,
then its key head, then its value head, ``head_dim`` rows each::

    [groups, per_group + 2, head_dim]   (GPT-NeoX's own fused layout is this with per_group = 1)

The output projection's columns follow the query heads in the same order (head ``h`` belongs to group
``h // per_group``). Because a group's rows are contiguous, tensor-parallel rank ``r`` of ``p`` holds the
contiguous block of groups ``[r * groups / p, (r + 1) * groups / p)``: its QKV rows and projection
columns are plain chunks, and a global selection of heads and groups maps to that rank's local rows by
``shard_selection``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QKVLayout:
    """The fused-QKV layout of one attention layer (``num_heads`` query heads in ``num_groups`` groups)."""

    num_heads: int
    num_groups: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def rows(self) -> int:
        """Rows of the fused weight."""
        return (self.num_heads + 2 * self.num_groups) * self.head_dim

    def selected_rows(self, groups: Sequence[int], heads: Sequence[int]) -> list[int]:
        """Fused rows of the kept ``groups`` (each with its key and value) and kept query ``heads``, in order."""
        d, per_group = self.head_dim, self.per_group
        block = (per_group + 2) * d
        kept = set(heads)
        rows: list[int] = []
        for g in groups:
            for h in range(g * per_group, (g + 1) * per_group):
                if h in kept:
                    start = g * block + (h - g * per_group) * d
                    rows += range(start, start + d)
            rows += range(g * block + per_group * d, (g + 1) * block)  # key and value heads
        return rows

    def selected_columns(self, heads: Sequence[int]) -> list[int]:
        """Columns of the output projection that read the kept query ``heads``."""
        return [h * self.head_dim + r for h in heads for r in range(self.head_dim)]

    def shard(self, tp_size: int) -> QKVLayout:
        """The layout one of ``tp_size`` tensor-parallel ranks holds."""
        return QKVLayout(self.num_heads // tp_size, self.num_groups // tp_size, self.head_dim)

    def shard_selection(
        self, groups: Sequence[int], heads: Sequence[int], tp_rank: int, tp_size: int
    ) -> tuple[list[int], list[int]]:
        """The kept groups and heads that live on ``tp_rank``, renumbered to its shard (possibly none)."""
        local_groups = self.num_groups // tp_size
        first_group = tp_rank * local_groups
        first_head = first_group * self.per_group
        mine = range(first_group, first_group + local_groups)
        local_g = [g - first_group for g in groups if g in mine]
        local_h = [h - first_head for h in heads if h // self.per_group in mine]
        return local_g, local_h

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Separate q, k, v weights (or biases) from the fused rows (the Hugging Face llama layout)."""
        tail = fused.shape[1:]
        d, per_group = self.head_dim, self.per_group
        q, k, v = fused.reshape(self.num_groups, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
        return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)

    def fuse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fused rows from separate q, k, v weights (or biases); inverse of ``split``."""
        tail = q.shape[1:]
        g, d = self.num_groups, self.head_dim
        parts = (q.reshape(g, self.per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail))
        return torch.cat(parts, dim=1).reshape(-1, *tail)

    @staticmethod
    def unpack(
        qkv: torch.Tensor, num_groups: int, per_group: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[b, heads, t, d]``, k and v ``[b, groups, t, d]`` from the fused output ``[b, t, rows]``."""
        b, t, _ = qkv.shape
        qkv = qkv.view(b, t, num_groups, per_group + 2, head_dim)  # [b, t, groups, per_group + 2, d]
        q = qkv[:, :, :, :per_group].reshape(b, t, num_groups * per_group, head_dim).transpose(1, 2)
        k = qkv[:, :, :, per_group].transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        return q, k, v
