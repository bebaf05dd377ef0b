"""Collectives over the tensor-parallel group, as autograd functions whose backward is the dual of the forward.

=====================================  ============================  ==============================
public function                        forward                       backward
=====================================  ============================  ==============================
copy_to_tensor_model_parallel_region   identity                      all-reduce (sum)
reduce_from_tensor_model_parallel_region  all-reduce (sum)           identity
scatter_to_tensor_model_parallel_region   keep this rank's chunk     all-gather
                                          of the last dimension
gather_from_tensor_model_parallel_region  all-gather the last dim    keep this rank's chunk
=====================================  ============================  ==============================

Layers call these; nobody calls ``torch.distributed`` in a model file. With one tensor-parallel rank
every function returns its input. ``all_reduce``/``all_gather_last_dim`` are the plain (no autograd)
collectives the vocab-parallel losses use inside their own autograd functions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_subnet.parallel import state


def _world() -> int:
    return state.get_tensor_model_parallel_world_size()


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the tensor-parallel group (no autograd); returns ``tensor``."""
    if _world() > 1:
        dist.all_reduce(tensor, op=op, group=state.get_tensor_model_parallel_group())
    return tensor


def all_gather_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor-parallel ranks' tensors concatenated along the last dimension, rank order (no autograd)."""
    world = _world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _split_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    world = _world()
    if world == 1:
        return tensor
    size = tensor.shape[-1]
    if size % world:
        raise ValueError(f"last dimension {size} does not split into {world} tensor-parallel ranks")
    return tensor.narrow(-1, state.get_tensor_model_parallel_rank() * (size // world), size // world).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous())


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_last_dim(grad)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: ``x``; backward: the gradients of every TP rank summed (the input feeds every rank's shard)."""
    return _CopyToRegion.apply(x) if _world() > 1 else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: the partial results of every TP rank summed; backward: the gradient as it is."""
    return _ReduceFromRegion.apply(x) if _world() > 1 else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: this rank's chunk of the last dimension; backward: the chunks' gradients gathered."""
    return _ScatterToRegion.apply(x) if _world() > 1 else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: every rank's chunk concatenated along the last dimension; backward: this rank's chunk."""
    return _GatherFromRegion.apply(x) if _world() > 1 else x
