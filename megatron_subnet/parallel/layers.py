"""Linear and embedding layers that accept a sub-network selection.

Each layer holds the parent's full weight and, given index tensors, computes with only the selected
rows (output features) and columns (input features): ``y = x @ W[rows][:, cols].T + b[rows]``.
Nothing is copied into the module, so switching sub-networks between calls is free. The names follow
Megatron-core (ColumnParallelLinear splits outputs, RowParallelLinear splits inputs across tensor-parallel
ranks); in this single-process build each rank holds the whole matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def select(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``weight[rows][:, cols]`` where a ``None`` index keeps everything along that dimension."""
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    return weight


class _SelectableLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        bias = self.bias if self.bias is None or rows is None else self.bias.index_select(0, rows)
        return F.linear(x, select(self.weight, rows, cols), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ColumnParallelLinear(_SelectableLinear):
    """Linear layer whose output features are the parallel (and selectable) dimension: QKV, MLP fc1."""


class RowParallelLinear(_SelectableLinear):
    """Linear layer whose input features are the parallel dimension: attention projection, MLP fc2."""


class VocabParallelEmbedding(nn.Module):
    """Token embedding; ``cols`` selects hidden channels of the sub-network."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, tokens: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        return out if cols is None else out.index_select(-1, cols)


class RMSNorm(nn.Module):
    """Root-mean-square norm; over a channel subset it normalises over that subset only."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if cols is None else self.weight.index_select(0, cols)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with bias; over a channel subset it normalises over that subset only."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if cols is None else (self.weight[cols], self.bias[cols])
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)


def scaled_init_std(std: float, num_layers: int) -> float:
    """Megatron's init for output projections: std / sqrt(2 * num_layers)."""
    return std / math.sqrt(2.0 * num_layers)
