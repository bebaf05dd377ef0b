"""Sub-networks of a parent model: which layers, hidden channels, heads / query groups and MLP neurons.

A ``SubnetConfig`` names parent indices explicitly. ``subnet_indices`` turns it into index tensors that
the parent's layers compute with (masked mode, ``indices.py``), and ``extract.extract_state_dict`` copies
the same rows and columns into a dense student (extracted mode); both use ``parallel.layers.select``, so the
two modes compute with identical numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_subnet.model.config import ConfigError, ModelConfig, is_int
from megatron_subnet.model.indices import LayerIndices, SubnetIndices
from megatron_subnet.model.qkv import QKVLayout
from megatron_subnet.outputs import write_text_atomically
from megatron_subnet.parallel.layers import TPShard

Counts = int | Sequence[int] | None


class ImportanceScores(Protocol):
    """Scores where higher means more important (see ``importance.py``)."""

    layers: torch.Tensor  # [parent layers]
    hidden: torch.Tensor  # [hidden]
    heads: list[torch.Tensor]  # per parent layer, [heads]
    query_groups: list[torch.Tensor]  # per parent layer, [groups]
    mlp: list[torch.Tensor]  # per parent layer, [ffn]


@dataclass
class SubnetConfig:
    """Kept parent indices; per-layer lists follow the order of ``layers``."""

    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]
    query_groups: list[list[int]]
    mlp: list[list[int]]

    def validate(self, parent: ModelConfig) -> None:
        """Raise ConfigError naming the first inconsistency with ``parent``."""
        _check_indices("layers", self.layers, parent.num_layers, "parent layers")
        _check_indices("hidden", self.hidden, parent.hidden_size, "hidden channels")
        for name in ("heads", "query_groups", "mlp"):
            if not isinstance(getattr(self, name), list | tuple):
                raise ConfigError(f"{name}: expected a list of index lists (one per kept layer)")
            if len(getattr(self, name)) != len(self.layers):
                raise ConfigError(f"{name}: {len(getattr(self, name))} entries for {len(self.layers)} kept layers")
        for j, layer in enumerate(self.layers):
            heads, groups = parent.layer_heads(layer), parent.layer_query_groups(layer)
            per_group = heads // groups
            _check_indices(f"query_groups[{j}]", self.query_groups[j], groups, f"query groups in layer {layer}")
            _check_indices(f"heads[{j}]", self.heads[j], heads, f"heads in layer {layer}")
            _check_indices(f"mlp[{j}]", self.mlp[j], parent.layer_ffn(layer), f"MLP neurons in layer {layer}")
            kept = set(self.query_groups[j])
            counts = {g: 0 for g in kept}
            for h in self.heads[j]:
                if h // per_group not in kept:
                    raise ConfigError(
                        f"heads[{j}]: head {h} belongs to query group {h // per_group}, which is not kept"
                    )
                counts[h // per_group] += 1
            if len(set(counts.values())) != 1 or 0 in counts.values():
                raise ConfigError(
                    f"heads[{j}]: kept query groups keep {sorted(counts.values())} heads; "
                    "every kept group must keep the same number (at least one)"
                )

    def student_config(self, parent: ModelConfig) -> ModelConfig:
        """The ModelConfig of the dense student this sub-network extracts to."""
        self.validate(parent)
        heads = [len(h) for h in self.heads]
        groups = [len(g) for g in self.query_groups]
        ffn = [len(m) for m in self.mlp]
        return dataclasses.replace(
            parent,
            hidden_size=len(self.hidden),
            num_layers=len(self.layers),
            num_attention_heads=_collapse(heads),
            num_query_groups=_collapse(groups),
            ffn_hidden_size=_collapse(ffn),
            extra=dict(parent.extra),
        )

    def num_parameters(self, parent: ModelConfig, include_embeddings: bool = True) -> int:
        """Exact parameter count of the sub-network (equal to its extracted student's)."""
        return self.student_config(parent).num_parameters(include_embeddings)

    @classmethod
    def full(cls, parent: ModelConfig) -> SubnetConfig:
        """The whole parent, as a sub-network."""
        return cls.from_counts(parent)

    @classmethod
    def from_counts(
        cls,
        parent: ModelConfig,
        num_layers: int | None = None,
        hidden_size: int | None = None,
        num_attention_heads: Counts = None,
        num_query_groups: Counts = None,
        ffn_hidden_size: Counts = None,
        importance: ImportanceScores | None = None,
    ) -> SubnetConfig:
        """Keep counts: the first k of everything, or the k most important when ``importance`` is given.

        Per-layer counts are lists over the kept layers. Query heads are kept per kept group, the same
        number in each (``num_attention_heads / num_query_groups``).
        """
        num_layers = parent.num_layers if num_layers is None else num_layers
        hidden_size = parent.hidden_size if hidden_size is None else hidden_size
        for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size)):
            if not is_int(value):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if not 1 <= num_layers <= parent.num_layers:
            raise ConfigError(f"num_layers {num_layers}: must be in 1..{parent.num_layers}")
        layers = _top(importance.layers if importance else None, parent.num_layers, num_layers)
        for name, value in (
            ("num_attention_heads", num_attention_heads),
            ("num_query_groups", num_query_groups),
            ("ffn_hidden_size", ffn_hidden_size),
        ):
            if value is None or is_int(value):
                continue
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise ConfigError(
                    f"{name}: expected an integer or a list of integers (one per kept layer), got {value!r}"
                )
            if len(value) != num_layers:
                raise ConfigError(f"{name}: {len(value)} per-layer values, need one per kept layer ({num_layers})")
        if not 1 <= hidden_size <= parent.hidden_size:
            raise ConfigError(f"hidden_size {hidden_size}: must be in 1..{parent.hidden_size}")
        hidden = _top(importance.hidden if importance else None, parent.hidden_size, hidden_size)
        heads, groups, mlp = [], [], []
        for j, layer in enumerate(layers):
            p_heads, p_groups, p_ffn = (
                parent.layer_heads(layer),
                parent.layer_query_groups(layer),
                parent.layer_ffn(layer),
            )
            n_groups = _count(num_query_groups, j, p_groups, "num_query_groups")
            n_heads = _count(num_attention_heads, j, p_heads * n_groups // p_groups, "num_attention_heads")
            per_group, p_per_group = n_heads // max(n_groups, 1), p_heads // p_groups
            if not 1 <= n_groups <= p_groups or n_heads % n_groups or not 1 <= per_group <= p_per_group:
                raise ConfigError(
                    f"layer {layer}: {n_heads} heads in {n_groups} query groups do not fit the parent's "
                    f"{p_heads} heads in {p_groups} groups"
                )
            kept_groups = _top(importance.query_groups[layer] if importance else None, p_groups, n_groups)
            kept_heads = []
            for g in kept_groups:
                scores = importance.heads[layer][g * p_per_group : (g + 1) * p_per_group] if importance else None
                kept_heads += [g * p_per_group + h for h in _top(scores, p_per_group, per_group)]
            n_ffn = _count(ffn_hidden_size, j, p_ffn, "ffn_hidden_size")
            if not 1 <= n_ffn <= p_ffn:
                raise ConfigError(f"layer {layer}: ffn_hidden_size {n_ffn} must be in 1..{p_ffn}")
            groups.append(kept_groups)
            heads.append(kept_heads)
            mlp.append(_top(importance.mlp[layer] if importance else None, p_ffn, n_ffn))
        subnet = cls(layers, hidden, heads, groups, mlp)
        subnet.validate(parent)
        return subnet

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomically(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def from_dict(cls, d: dict, parent: ModelConfig, importance: ImportanceScores | None = None) -> SubnetConfig:
        """Explicit indices (``layers``, ``hidden``, ...) or counts (``num_layers``, ``hidden_size``, ...).

        Indices and counts must be JSON integers (not strings, booleans or floats); per-layer lists hold
        exactly one entry per kept layer; ``order`` is ``"first"`` (default) or ``"importance"``.
        """
        if not isinstance(d, dict):
            raise ConfigError("expected a JSON object")
        explicit = {f.name for f in dataclasses.fields(cls)}
        counts = {"num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "order"}
        if set(d) & explicit:
            if set(d) - explicit:
                raise ConfigError(f"unexpected keys {sorted(set(d) - explicit)} beside explicit indices")
            missing = sorted(explicit - set(d))
            if missing:
                raise ConfigError(f"missing keys {missing}")
            subnet = cls(**{k: d[k] for k in explicit})
            subnet.validate(parent)
            return subnet
        if set(d) - counts:
            raise ConfigError(f"unknown keys {sorted(set(d) - counts)}; expected explicit indices or counts")
        order = d.get("order", "first")
        if not isinstance(order, str) or order not in ("first", "importance"):
            raise ConfigError(f"order {order!r}: expected 'first' or 'importance'")
        if order == "importance" and importance is None:
            raise ConfigError("order 'importance' needs importance scores (--importance FILE)")
        kwargs = {k: v for k, v in d.items() if k != "order"}
        return cls.from_counts(parent, **kwargs, importance=importance if order == "importance" else None)

    @classmethod
    def load(cls, path: str | os.PathLike, parent: ModelConfig, importance: ImportanceScores | None = None):
        """Read and validate a sub-network JSON; ConfigError names the file and the problem."""
        try:
            with open(path) as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise ConfigError("expected a JSON object")
            return cls.from_dict(d, parent, importance)
        except (OSError, json.JSONDecodeError, ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: invalid sub-network ({e})") from None


def _check_indices(name: str, indices: Sequence[int], size: int, what: str) -> None:
    if not isinstance(indices, list | tuple) or not all(is_int(i) for i in indices):
        raise ConfigError(f"{name}: expected a list of integers, got {indices!r}")
    if not indices:
        raise ConfigError(f"{name}: empty")
    for a, b in zip(indices, indices[1:]):
        if a == b:
            raise ConfigError(f"{name}: duplicate index {a}")
        if a > b:
            raise ConfigError(f"{name}: indices must be ascending ({a} before {b})")
    if indices[0] < 0 or indices[-1] >= size:
        bad = indices[0] if indices[0] < 0 else indices[-1]
        raise ConfigError(f"{name}: index {bad} out of range for {size} {what}")


def _collapse(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def _count(value: Counts, j: int, default: int, name: str) -> int:
    if value is None:
        return default
    if is_int(value):
        return value
    if j >= len(value):
        raise ConfigError(f"{name}: {len(value)} per-layer values, need one per kept layer")
    if not is_int(value[j]):
        raise ConfigError(f"{name}[{j}]: expected an integer, got {value[j]!r}")
    return value[j]


def _top(scores: torch.Tensor | None, size: int, k: int) -> list[int]:
    """The first k indices, or the k highest-scoring ones (ties to the lower index), ascending."""
    if scores is None:
        return list(range(k))
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if len(scores) != size:
        raise ConfigError(f"importance scores have {len(scores)} entries, the parent has {size}")
    order = sorted(range(size), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _as_index(indices: Sequence[int], size: int, device: torch.device) -> torch.Tensor | None:
    if len(indices) == size:
        return None  # validated ascending and unique, so this is everything
    return torch.tensor(indices, dtype=torch.long, device=device)


def subnet_indices(
    parent: ModelConfig, subnet: SubnetConfig, device: torch.device | str = "cpu", shard: TPShard | None = None
) -> SubnetIndices:
    """Index tensors for running ``subnet`` on the parent's weights, in the LOCAL numbering of tensor-parallel
    ``shard`` (default: this rank's): the heads, query groups and MLP neurons of the selection that live on
    it (possibly none); hidden channels are replicated."""
    subnet.validate(parent)
    shard = shard or TPShard.current()
    per_layer = []
    for j, layer in enumerate(subnet.layers):
        layout = QKVLayout(parent.layer_heads(layer), parent.layer_query_groups(layer), parent.head_dim)
        local = layout.shard(shard.size)
        groups, heads = layout.shard_selection(subnet.query_groups[j], subnet.heads[j], shard.rank, shard.size)
        ffn_local = parent.layer_ffn(layer) // shard.size
        first_neuron = shard.rank * ffn_local
        neurons = [n - first_neuron for n in subnet.mlp[j] if first_neuron <= n < first_neuron + ffn_local]
        per_layer.append(
            LayerIndices(
                num_heads=len(heads),
                num_groups=len(groups),
                qkv_rows=_as_index(local.selected_rows(groups, heads), local.rows, device),
                proj_cols=_as_index(local.selected_columns(heads), local.num_heads * local.head_dim, device),
                mlp_rows=_as_index(neurons, ffn_local, device),
            )
        )
    return SubnetIndices(list(subnet.layers), _as_index(subnet.hidden, parent.hidden_size, device), per_layer)
