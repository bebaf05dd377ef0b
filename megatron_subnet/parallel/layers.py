"""Megatron's tensor-parallel layers, each able to compute with a sub-network selection of its own shard.

A selection is a pair of index tensors in the shard's LOCAL numbering: ``rows`` (output features) and
``cols`` (input features); ``None`` keeps a whole dimension. A layer computes
``y = x @ W[rows][:, cols].T + b[rows]`` on the weights it holds, copying nothing into the module, so
switching sub-networks between calls is free. A rank whose shard keeps nothing still takes part in the
collectives with zeros, which is what keeps a masked run exact when kept heads fall unevenly on ranks.

Every split parameter carries ``tensor_model_parallel = True`` and ``partition_dim`` (what DeepSpeed's
gradient norm and our checkpoint converter read); replicated parameters carry neither. Random init draws
the full tensor from the shared RNG stream and keeps this rank's chunk, so a TP run starts from the same
weights as a single process with the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_subnet.parallel import state
from megatron_subnet.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


@dataclass(frozen=True)
class TPShard:
    """Which of ``size`` tensor-parallel shards a layer holds."""

    rank: int = 0
    size: int = 1

    @staticmethod
    def current() -> TPShard:
        return TPShard(state.get_tensor_model_parallel_rank(), state.get_tensor_model_parallel_world_size())


WHOLE = TPShard()  # the whole tensor: one tensor-parallel rank


def divide(total: int, parts: int, what: str) -> int:
    """``total / parts``; ValueError naming the dimension when it does not split evenly."""
    if total % parts:
        raise ValueError(f"{what} {total} is not divisible by --tensor-model-parallel-size {parts}")
    return total // parts


def select(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``weight[rows][:, cols]`` where a ``None`` index keeps everything along that dimension; the indices may
    lie on another device than ``weight`` (they move to it: an accelerator selects with its own indices)."""
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    return weight


def mark_partitioned(param: nn.Parameter, dim: int) -> nn.Parameter:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def init_normal_shard(param: torch.Tensor, std: float, shard: TPShard, dim: int | None) -> None:
    """Normal(0, std) init of ``param``: the full tensor's chunk ``shard.rank`` along ``dim`` (None: replicated)."""
    if param.is_meta:
        return
    if dim is None or shard.size == 1:
        nn.init.normal_(param, mean=0.0, std=std)
        return
    shape = list(param.shape)
    shape[dim] *= shard.size
    full = torch.empty(shape, dtype=param.dtype, device=param.device)
    nn.init.normal_(full, mean=0.0, std=std)
    with torch.no_grad():
        param.copy_(full.chunk(shard.size, dim)[shard.rank])


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split by rows (output features): ``A = [A_1; ...; A_p]``, ``b = [b_1 ... b_p]``.

    Rank ``i`` computes ``Y_i = X A_i^T + b_i`` from the full ``X`` (its gradient all-reduced on the way
    back). ``gather_output`` all-gathers ``Y``; otherwise ``Y`` stays split along its last dimension, ready
    for a ``RowParallelLinear`` (QKV, MLP fc1/gate) or a vocab-parallel loss (the output layer).
    ``copy_input=False``: the caller already passed ``X`` through ``copy_to_tensor_model_parallel_region``
    (two layers reading one input, like SwiGLU's fc1 and gate, then share one all-reduce of its gradient).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_std: float = 0.02,
        gather_output: bool = False,
        copy_input: bool = True,
        shard: TPShard | None = None,
        what: str = "output features",
    ):
        super().__init__()
        self.shard = shard or TPShard.current()
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = divide(out_features, self.shard.size, what)
        self.gather_output, self.copy_input = gather_output, copy_input
        self.weight = mark_partitioned(nn.Parameter(torch.empty(self.out_per_rank, in_features)), 0)
        self.bias = mark_partitioned(nn.Parameter(torch.empty(self.out_per_rank)), 0) if bias else None
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_shard(self.weight, self.init_std, self.shard, 0)
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tensor_model_parallel_region(x)
        bias = self.bias if self.bias is None or rows is None else self.bias.index_select(0, rows)
        y = F.linear(x, select(self.weight, rows, cols), bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"({self.out_per_rank} on this rank), bias={self.bias is not None}"
        )


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split by columns (input features): ``A = [A_1, ..., A_p]``, ``X = [X_1 ... X_p]``.

    The input arrives split (``input_is_parallel``: the output of a ColumnParallelLinear); rank ``i``
    computes ``X_i A_i^T``, the partial sums are all-reduced, and the bias (replicated) is added once,
    after the all-reduce.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_std: float = 0.02,
        shard: TPShard | None = None,
        what: str = "input features",
    ):
        super().__init__()
        self.shard = shard or TPShard.current()
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = divide(in_features, self.shard.size, what)
        self.weight = mark_partitioned(nn.Parameter(torch.empty(out_features, self.in_per_rank)), 1)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_shard(self.weight, self.init_std, self.shard, 1)
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = reduce_from_tensor_model_parallel_region(F.linear(x, select(self.weight, rows, cols)))
        if self.bias is None:
            return y
        return y + (self.bias if rows is None else self.bias.index_select(0, rows))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} ({self.in_per_rank} on this rank), "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split by rows: rank ``i`` holds ids ``[i V/p, (i+1) V/p)``.

    Each rank looks up the ids it holds (zeros for the others) and the results are all-reduced. ``cols``
    selects hidden channels of a sub-network (before the all-reduce, so it moves fewer bytes).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02, shard: TPShard | None = None):
        super().__init__()
        self.shard = shard or TPShard.current()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_rank = divide(num_embeddings, self.shard.size, "vocab_size")
        self.vocab_start = self.shard.rank * self.per_rank
        self.weight = mark_partitioned(nn.Parameter(torch.empty(self.per_rank, embedding_dim)), 0)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_shard(self.weight, self.init_std, self.shard, 0)

    def forward(self, tokens: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        if self.shard.size == 1:
            out = F.embedding(tokens, self.weight)
            return out if cols is None else out.index_select(-1, cols)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out if cols is None else out.index_select(-1, cols)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out)


class RMSNorm(nn.Module):
    """Root-mean-square norm (replicated); over a channel subset it normalises over that subset only."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if cols is None else self.weight.index_select(0, cols)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with bias (replicated); over a channel subset it normalises over that subset only."""

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
