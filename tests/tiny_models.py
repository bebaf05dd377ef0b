"""Tiny parents for the tests, by architecture (LitGPT's per-architecture table): what makes each family
itself lives here once; each test gives only the small shape its numbers need.

    ModelConfig(**tiny("gpt_neox", hidden_size=32, num_layers=2, ...))

The ``tiny_config`` fixture (``conftest.py``) is ``tiny_shape`` of each family in turn, for a test that holds for
every architecture."""

from __future__ import annotations

FAMILIES: dict[str, dict] = {
    # RMSNorm, SwiGLU, rotary on every channel, no biases (the defaults)
    "llama": dict(arch="llama"),
    # llama with a bias on q, k and v
    "qwen2": dict(arch="llama", qkv_bias=True),
    # Pythia: LayerNorm with bias, GELU, every bias, parallel residual, partial rotary
    "gpt_neox": dict(
        arch="gpt_neox",
        activation="gelu",
        normalization="layernorm",
        qkv_bias=True,
        proj_bias=True,
        mlp_bias=True,
        parallel_residual=True,
        rotary_pct=0.25,
    ),
}

# one small shape per family (the ``tiny_config`` fixture): grouped-query attention for llama; multi-head attention,
# half the channels rotated and a tied embedding for GPT-NeoX
SHAPES: dict[str, dict] = {
    "llama": dict(vocab_size=64, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                  head_dim=8, ffn_hidden_size=48, init_std=0.2),
    "gpt_neox": dict(vocab_size=64, hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=4,
                     head_dim=8, ffn_hidden_size=40, rotary_pct=0.5, tie_word_embeddings=True, init_std=0.2),
}  # fmt: skip


def tiny(family: str, **shape) -> dict:
    """The keyword arguments of a ``ModelConfig`` of ``family`` with ``shape`` (sizes, and any override of
    the family's facts)."""
    return {**FAMILIES[family], **shape}


def tiny_shape(family: str, **overrides) -> dict:
    """``tiny`` with the family's standard small shape (``SHAPES``)."""
    return tiny(family, **{**SHAPES[family], **overrides})
