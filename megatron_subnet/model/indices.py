"""The index types of a sub-network selection, as the parent's layers compute with them (masked mode).

``subnet.subnet_indices`` builds them from a ``SubnetConfig`` in the local numbering of one tensor-parallel
shard; ``gpt.GPTModel`` runs them; ``extract`` copies the same rows and columns into a dense student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerIndices:
    """Index tensors for one kept layer; ``None`` keeps the whole dimension."""

    num_heads: int
    num_groups: int
    qkv_rows: torch.Tensor | None
    proj_cols: torch.Tensor | None
    mlp_rows: torch.Tensor | None


@dataclass
class SubnetIndices:
    """The kept parent layers (global numbering), the kept hidden channels, and each kept layer's indices."""

    layers: list[int]
    hidden: torch.Tensor | None
    per_layer: list[LayerIndices]
