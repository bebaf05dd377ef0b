"""FLOPs per token of a ModelConfig, for model FLOPs utilisation (MFU).

A matmul of ``[m, k] @ [k, n]`` counts ``2 * m * n * k``. Counted: the fused QKV and output projections, the
MLP (fc1, gate when SwiGLU, fc2), attention's ``Q K^T`` and ``A V``, and the logits (``2 * hidden * vocab``
per token whether or not the output layer is tied to the embedding). Not counted: the embedding lookup,
norms, activations, rotary, softmax, residual adds and biases (``torch.utils.flop_counter.FlopCounterMode``
leaves them out too).

Attention is counted dense over the whole sequence, not halved for the causal mask: per token and layer
``2 * 2 * heads * head_dim * seq_length``. That is FlopCounterMode's formula for
``scaled_dot_product_attention`` and the one in PaLM's MFU (appendix B), so MFU figures compare with theirs.

The totals are the whole model's (all tensor- and pipeline-parallel ranks together).
"""

from __future__ import annotations

from megatron_subnet.model.config import ModelConfig

RECOMPUTE = (None, "full", "selective")


def layer_linear_flops_per_token(config: ModelConfig, i: int) -> float:
    """Forward FLOPs per token of layer ``i``'s weight matmuls: fused QKV, output projection, MLP."""
    h, d = config.hidden_size, config.head_dim
    heads, groups, ffn = config.layer_heads(i), config.layer_query_groups(i), config.layer_ffn(i)
    qkv = 2 * h * (heads + 2 * groups) * d
    proj = 2 * heads * d * h
    mlp = 2 * h * ffn * (3 if config.gated_mlp else 2)
    return float(qkv + proj + mlp)


def attention_core_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of ``Q K^T`` and ``A V`` over all layers, dense over ``seq_length`` keys."""
    _check_seq_length(seq_length)
    return float(sum(4 * config.layer_heads(i) * config.head_dim * seq_length for i in range(config.num_layers)))


def logits_flops_per_token(config: ModelConfig) -> float:
    """Forward FLOPs per token of the output layer (tied or not); the embedding lookup counts 0."""
    return float(2 * config.hidden_size * config.vocab_size)


def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of a ``seq_length``-token sequence (see the module docstring)."""
    linear = sum(layer_linear_flops_per_token(config, i) for i in range(config.num_layers))
    return linear + attention_core_flops_per_token(config, seq_length) + logits_flops_per_token(config)


def training_flops_per_token(config: ModelConfig, seq_length: int, recompute: str | None = None) -> float:
    """FLOPs per token of one training step: forward + backward (2x forward) = 3x forward.

    Recomputation (``GPTModel.set_recompute``) adds what the backward pass runs again: ``"full"`` every
    transformer layer's forward (Megatron's full recompute; the output layer is not rerun), so a little under
    4x forward; ``"selective"`` the attention core (``Q K^T`` and ``A V``) only. An upper bound of what runs:
    the non-reentrant checkpoint stops rerunning once every tensor the backward needs is back, which skips a
    layer's last matmul (fc2) when nothing else needs it (pinned in tests/test_flops.py).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: expected one of {', '.join(map(repr, RECOMPUTE))}")
    forward = forward_flops_per_token(config, seq_length)
    if recompute == "full":
        return 4 * forward - logits_flops_per_token(config)
    if recompute == "selective":
        return 3 * forward + attention_core_flops_per_token(config, seq_length)
    return 3 * forward


def _check_seq_length(seq_length: int) -> None:
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length: must be an integer >= 1, got {seq_length!r}")
