"""ModelConfig: the architecture of a decoder-only transformer, JSON in and out.

Two families share one model: ``llama`` (RMSNorm, SwiGLU, RoPE, grouped-query attention; also Qwen2
with q/k/v bias) and ``gpt_neox`` (Pythia: LayerNorm with bias, GELU MLP, parallel residual, partial
rotary). Per-layer sizes (heads, query groups, MLP width) may be lists: a student extracted from a
per-layer sub-network has layers of different widths.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

ARCHITECTURES = ("llama", "gpt_neox")
ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "relu")


class ConfigError(ValueError):
    """A configuration that is inconsistent or cannot describe the given weights."""


def _per_layer(value: int | list[int], num_layers: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) != num_layers:
        raise ConfigError(f"{name}: {len(value)} per-layer values for {num_layers} layers")
    return list(value)


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer; int-or-list fields may vary per layer."""

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
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch {self.arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if self.normalization not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"normalization {self.normalization!r}: expected rmsnorm or layernorm")
        for name in ("vocab_size", "hidden_size", "num_layers", "head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for i in range(self.num_layers):
            heads, groups = self.layer_heads(i), self.layer_query_groups(i)
            if groups < 1 or heads < 1 or heads % groups:
                raise ConfigError(f"layer {i}: {heads} attention heads do not split into {groups} query groups")
            if self.layer_ffn(i) < 1:
                raise ConfigError(f"layer {i}: ffn_hidden_size must be positive")
        if not 0.0 < self.rotary_pct <= 1.0 or self.rotary_dim % 2:
            raise ConfigError(f"rotary_pct {self.rotary_pct}: gives an odd or empty rotary dimension")

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read model config ({e})") from None
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None
