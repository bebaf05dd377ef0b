"""Process groups of the tensor-, pipeline- and data-parallel dimensions, and rank queries.

Ranks are laid out as Megatron lays them out (tensor-parallel neighbours adjacent, then pipeline, then
data). Tensor and pipeline sizes are 1 so far: every rank is a data-parallel replica.
"""

from __future__ import annotations

import torch.distributed as dist

_TP_SIZE = 1
_PP_SIZE = 1
_DP_GROUP: dist.ProcessGroup | None = None


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
    """Create the groups; call after torch.distributed is initialised."""
    global _TP_SIZE, _PP_SIZE, _DP_GROUP
    if tensor_model_parallel_size != 1 or pipeline_model_parallel_size != 1:
        raise ValueError("tensor/pipeline model parallel sizes other than 1 are not supported yet")
    _TP_SIZE, _PP_SIZE = tensor_model_parallel_size, pipeline_model_parallel_size
    _DP_GROUP = dist.group.WORLD


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tensor_model_parallel_world_size() -> int:
    return _TP_SIZE


def get_pipeline_model_parallel_world_size() -> int:
    return _PP_SIZE


def get_data_parallel_group() -> dist.ProcessGroup | None:
    return _DP_GROUP


def get_data_parallel_world_size() -> int:
    return dist.get_world_size(_DP_GROUP) if is_initialized() else 1


def get_data_parallel_rank() -> int:
    return dist.get_rank(_DP_GROUP) if is_initialized() else 0
