"""What shape and tensor-parallel partition dimension each parameter of a model has, asked of the model.

One build of ``GPTModel`` on the meta device (no memory, no init) answers for a config, a tensor-parallel
shard and a pipeline stage, so the checkpoint readers, the converters and sub-network extraction agree
with the model by construction instead of keeping a table of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.parallel.layers import WHOLE, TPShard
from megatron_subnet.parallel.pipeline import PipelineStage


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]  # on this shard and stage
    partition_dim: int | None  # the dimension split over tensor-parallel ranks; None: replicated


def parameter_specs(
    config: ModelConfig, shard: TPShard = WHOLE, stage: PipelineStage | None = None
) -> dict[str, ParamSpec]:
    """Every tensor a model of ``config`` holds on ``shard`` and pipeline ``stage`` (default: the whole
    model), by state-dict name. ValueError naming the dimension when ``config`` does not split into
    ``shard.size`` ranks."""
    with torch.device("meta"):
        model = GPTModel(config, shard, stage)
    params = dict(model.named_parameters())
    return {
        name: ParamSpec(tuple(t.shape), _partition_dim(params.get(name)))
        for name, t in model.state_dict().items()
    }


def _partition_dim(param: torch.nn.Parameter | None) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def expected_shapes(
    config: ModelConfig, shard: TPShard = WHOLE, stage: PipelineStage | None = None
) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of ``config`` on ``shard`` and ``stage`` (``parameter_specs``)."""
    return {name: spec.shape for name, spec in parameter_specs(config, shard, stage).items()}


def partition_dims(config: ModelConfig) -> dict[str, int | None]:
    """The dimension each tensor is split on under tensor parallelism (None: replicated)."""
    return {name: spec.partition_dim for name, spec in parameter_specs(config).items()}


def check_divisible(config: ModelConfig, tp_size: int) -> None:
    """ValueError naming the first dimension of ``config`` that does not split into ``tp_size`` ranks."""
    if tp_size > 1:
        parameter_specs(config, TPShard(0, tp_size))
