"""ModelConfig: the architecture of a decoder-only transformer, JSON in and out.

Two families share one model: ``llama`` (RMSNorm, SwiGLU, RoPE, grouped-query attention; also Qwen2
with q/k/v bias) and ``gpt_neox`` (Pythia: LayerNorm with bias, GELU MLP, parallel residual, partial
rotary). Per-layer sizes (heads, query groups, MLP width) may be lists: a student extracted from a
per-layer sub-network has layers of different widths.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from megatron_subnet.outputs import write_text_atomically

ARCHITECTURES = ("llama", "gpt_neox")
ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "relu")
NORMALIZATIONS = ("rmsnorm", "layernorm")

# Fields a model_config.json may leave out: none of them changes the numbers a loaded model computes.
FILE_DEFAULTS = {"extra": {}, "bos_token_id": None, "eos_token_id": None, "init_std": 0.02}


class ConfigError(ValueError):
    """A configuration that is inconsistent or cannot describe the given weights."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


def is_int(value) -> bool:
    """An int that is not a bool (JSON ``true`` is no layer index)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_size(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")


def _check_sizes(name: str, value, num_layers: int) -> None:
    """An int >= 1, or a list of such ints, one per layer."""
    if isinstance(value, list | tuple):
        if len(value) != num_layers:
            raise ConfigError(f"{name}: {len(value)} per-layer values for {num_layers} layers")
        for i, v in enumerate(value):
            _check_size(f"{name}[{i}]", v)
    else:
        if not is_int(value):
            raise ConfigError(f"{name}: must be an integer >= 1 or a list of them (one per layer), got {value!r}")
        _check_size(name, value)


def _per_layer(value: int | list[int], num_layers: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) != num_layers:
        raise ConfigError(f"{name}: {len(value)} per-layer values for {num_layers} layers")
    return list(value)


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer; int-or-list fields may vary per layer.

    The constructor's defaults serve code that builds a config; a ``model_config.json`` (``load``,
    ``from_dict``) must name every field except ``extra`` (default ``{}``), ``bos_token_id`` and
    ``eos_token_id`` (default ``None``) and ``init_std`` (default 0.02, used only to initialise random
    weights): a missing ``norm_eps`` or ``rope_theta`` would silently change a loaded model's numbers.
    ``validate`` (run by the constructor) checks the type and range of every field.
    """

    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_attention_heads: int | list[int] = 8
    num_query_groups: int | list[int] = 8
    head_dim: int = 64
    ffn_hidden_size: int | list[int] = 1376
    activation: str = "swiglu"
    normalization: str = "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # HF config fields we carry through but do not interpret

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first field whose type or value is wrong (``field: must be ..., got ...``)."""
        for name, allowed in (("arch", ARCHITECTURES), ("activation", ACTIVATIONS), ("normalization", NORMALIZATIONS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "head_dim", "max_position_embeddings"):
            _check_size(name, getattr(self, name))
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            _check_sizes(name, getattr(self, name), self.num_layers)
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")
        if not _is_number(self.rotary_pct) or not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct: must be a number in (0, 1], got {self.rotary_pct!r}")
        for name in ("tie_word_embeddings", "qkv_bias", "proj_bias", "mlp_bias", "parallel_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not is_int(value):
                raise ConfigError(f"{name}: must be an integer token id or null, got {value!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra: must be a JSON object, got {self.extra!r}")
        for i in range(self.num_layers):
            heads, groups = self.layer_heads(i), self.layer_query_groups(i)
            if heads % groups:
                raise ConfigError(f"layer {i}: {heads} attention heads do not split into {groups} query groups")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(f"rotary_pct {self.rotary_pct}: gives an odd or empty rotary dimension")

    def check_seq_length(self, seq_length: int, flag: str = "--seq-length") -> None:
        """ConfigError when ``seq_length`` exceeds the positions the model was built for."""
        if seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"{flag} {seq_length}: longer than the model's max_position_embeddings "
                f"{self.max_position_embeddings}"
            )

    def layer_heads(self, i: int) -> int:
        return _per_layer(self.num_attention_heads, self.num_layers, "num_attention_heads")[i]

    def layer_query_groups(self, i: int) -> int:
        return _per_layer(self.num_query_groups, self.num_layers, "num_query_groups")[i]

    def layer_ffn(self, i: int) -> int:
        return _per_layer(self.ffn_hidden_size, self.num_layers, "ffn_hidden_size")[i]

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same shape (what Hugging Face configs can express)."""
        return all(
            isinstance(v, int) or len(set(v)) <= 1
            for v in (self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size)
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def gated_mlp(self) -> bool:
        return self.activation == "swiglu"

    def layer_parameters(self, i: int) -> int:
        """Exact parameter count of transformer layer ``i``."""
        h, d = self.hidden_size, self.head_dim
        heads, groups, ffn = self.layer_heads(i), self.layer_query_groups(i), self.layer_ffn(i)
        norm = h * (2 if self.normalization == "layernorm" else 1)
        qkv_out = (heads + 2 * groups) * d
        attention = qkv_out * h + (qkv_out if self.qkv_bias else 0) + heads * d * h + (h if self.proj_bias else 0)
        mlp = ffn * h * (3 if self.gated_mlp else 2) + ((2 if self.gated_mlp else 1) * ffn + h if self.mlp_bias else 0)
        return 2 * norm + attention + mlp

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Exact parameter count; without embeddings it leaves out the input and output vocab matrices."""
        h = self.hidden_size
        final_norm = h * (2 if self.normalization == "layernorm" else 1)
        total = sum(self.layer_parameters(i) for i in range(self.num_layers)) + final_norm
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A config as ``model_config.json`` holds it: every field but those in ``FILE_DEFAULTS`` is required."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        missing = [name for name in known if name not in d and name not in FILE_DEFAULTS]
        if missing:
            raise ConfigError(
                f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} (only "
                f"{', '.join(FILE_DEFAULTS)} may be left out)"
            )
        return cls(**{name: d.get(name, copy.deepcopy(FILE_DEFAULTS.get(name))) for name in known})

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Read and validate a ``model_config.json``; ConfigError names the file and the field."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read model config ({e})") from None
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None
