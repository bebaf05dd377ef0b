"""A dense student cut from its parent: the sub-network's rows and columns of the parent's weights (extracted
mode), read through ``parallel.layers.select``'s indices as the masked parent computes with them, so masked
and extracted compute with identical numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.shapes import parameter_specs
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices
from megatron_subnet.parallel.layers import WHOLE, TPShard, select
from megatron_subnet.parallel.pipeline import PipelineStage


def extract_state_dict(
    parent: ModelConfig, state: dict[str, torch.Tensor], subnet: SubnetConfig
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The dense student's config and weights: the sub-network's rows and columns of the parent's."""
    return extract_shard(parent, lambda name, rows, cols: select(state[name], rows, cols), subnet, WHOLE)


def extract_shard(
    parent: ModelConfig,
    read: Callable[[str, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
    subnet: SubnetConfig,
    shard: TPShard,
    stage: PipelineStage | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The student's config and the weights of its tensor-parallel ``shard`` and pipeline ``stage`` (default:
    all layers), fetched through ``read(parent tensor name, rows, cols)`` in the parent's global numbering
    (a ``CheckpointReader`` reads only those bytes): no rank needs the whole parent. ValueError when the
    student does not split into ``shard.size`` ranks."""
    student = subnet.student_config(parent)
    specs = parameter_specs(student, shard, stage)  # raises, naming the dimension, when the student cannot split
    index = subnet_indices(parent, subnet, "cpu", WHOLE)
    hidden = index.hidden

    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str, rows: torch.Tensor | None, cols: torch.Tensor | None = None) -> None:
        if dst not in specs:  # another pipeline stage's tensor (or a bias this architecture has not)
            return
        dim = specs[dst].partition_dim
        if dim is not None and shard.size > 1:  # this shard's chunk of the student's rows (or columns)
            full = rows if dim == 0 else cols
            n = specs[dst].shape[dim]
            chunk = (torch.arange(n * shard.size) if full is None else full)[shard.rank * n : (shard.rank + 1) * n]
            rows, cols = (chunk, cols) if dim == 0 else (rows, chunk)
        out[dst] = read(src, rows, cols).clone().contiguous()

    take("embedding.weight", "embedding.weight", None, hidden)
    norm_params = ["weight"] + (["bias"] if parent.normalization == "layernorm" else [])
    for j, (i, li) in enumerate(zip(index.layers, index.per_layer)):
        src, dst = f"layers.{i}.", f"layers.{j}."
        linears = {
            "self_attention.linear_qkv": (li.qkv_rows, hidden),
            "self_attention.linear_proj": (hidden, li.proj_cols),
            "mlp.linear_fc1": (li.mlp_rows, hidden),
            "mlp.linear_fc2": (hidden, li.mlp_rows),
        }
        if parent.gated_mlp:
            linears["mlp.linear_gate"] = (li.mlp_rows, hidden)
        for name, (rows, cols) in linears.items():
            take(f"{src}{name}.weight", f"{dst}{name}.weight", rows, cols)
            take(f"{src}{name}.bias", f"{dst}{name}.bias", rows)
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            for p in norm_params:
                take(f"{src}{norm}.{p}", f"{dst}{norm}.{p}", hidden)
    for p in norm_params:
        take(f"final_layernorm.{p}", f"final_layernorm.{p}", hidden)
    take("output_layer.weight", "output_layer.weight", None, hidden)
    return student, out
