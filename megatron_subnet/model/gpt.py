"""Decoder-only transformer (llama and GPT-NeoX families) that runs whole or as a masked sub-network.

``model(tokens)`` runs the dense network. ``model(tokens, subnet=...)`` runs only the selected layers,
hidden channels, heads / query groups and MLP neurons of the same weights (see ``subnet.py``).

Attention keeps Megatron's fused QKV layout, grouped by query group (``qkv.py`` owns it). The layers are
Megatron's tensor-parallel ones (``parallel/layers.py``): with one TP rank they hold whole matrices.

``model.set_recompute("full" | "selective" | None)`` turns on Megatron's activation recomputation
(``--recompute-granularity``); ``compile.compile_model`` compiles the layers (``--compile``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.indices import LayerIndices, SubnetIndices
from megatron_subnet.model.qkv import QKVLayout
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices
from megatron_subnet.parallel.layers import (
    ColumnParallelLinear,
    LayerNorm,
    RMSNorm,
    RowParallelLinear,
    TPShard,
    VocabParallelEmbedding,
    divide,
    scaled_init_std,
)
from megatron_subnet.parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_subnet.parallel.pipeline import PipelineStage

RECOMPUTE_GRANULARITIES = ("full", "selective")

_ACTIVATIONS = {
    "swiglu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def make_norm(config: ModelConfig) -> nn.Module:
    if config.normalization == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return LayerNorm(config.hidden_size, config.norm_eps)


def rotary_cos_sin(config: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[seq_len, rotary_dim]`` in fp32 (non-interleaved, "rotate half" convention)."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of each head of ``x [batch, heads, seq, head_dim]``."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


def core_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotary, causal attention and the heads joined: ``q [b, heads, t, d]``, ``k, v [b, groups, t, d]`` to
    ``[b, t, heads * d]``. What selective recomputation re-runs in backward: it has no weights and no
    collective, and what its ops save (rotated q and k, the output and its log-sum-exp; on SDPA's math path
    also the ``[heads, t, t]`` probabilities) outweighs the q/k/v it starts from."""
    b, heads, t, d = q.shape
    # a branch, not a comparison: compiled with symbolic sizes, it still hands SDPA a Python bool
    gqa = True if heads > k.shape[1] else False  # noqa: SIM210
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(b, t, heads * d)


def recomputing(module: nn.Module) -> bool:
    """Recomputation applies to training forwards that build a graph (not to eval or ``no_grad``)."""
    return module.training and torch.is_grad_enabled()


def checkpointed(fn, *args, replay_all: bool = False):
    """``fn(*args)`` keeping only its inputs for backward, where it runs again (non-reentrant checkpoint:
    it takes any Python arguments, such as ``LayerIndices``, and inputs with or without grad).
    ``replay_all``: no early stop, so a recomputed layer under tensor parallelism re-runs every collective
    of its forward, in order, on every rank (as Megatron does), whatever each rank's ops saved."""
    return checkpoint(fn, *args, use_reentrant=False, early_stop=not replay_all)


def keeps_nothing(x, cos, sin, index: LayerIndices | None = None, hidden=None) -> bool:
    """Whether this TP rank's shard of a layer keeps no head or no MLP neuron of the sub-network ``index``
    (it then multiplies over an empty dimension and adds zeros to the all-reduce)."""
    if index is None:
        return False
    return index.num_heads == 0 or (index.mlp_rows is not None and index.mlp_rows.numel() == 0)


class SelfAttention(nn.Module):
    """Causal self-attention with grouped queries; under TP each rank holds a contiguous block of query groups
    (with their heads) of the fused QKV rows and the matching columns of the output projection."""

    recompute_core: bool = False  # selective recomputation (GPTModel.set_recompute)

    def __init__(self, config: ModelConfig, layer: int, shard: TPShard):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        heads, groups = config.layer_heads(layer), config.layer_query_groups(layer)
        divide(groups, shard.size, f"layer {layer}: num_query_groups")
        self.layout = QKVLayout(heads, groups, d).shard(shard.size)  # this rank's heads and groups
        self.head_dim = d
        self.linear_qkv = ColumnParallelLinear(
            h, (heads + 2 * groups) * d, bias=config.qkv_bias, init_std=config.init_std, shard=shard,
            what=f"layer {layer}: fused QKV rows",
        )  # fmt: skip
        self.linear_proj = RowParallelLinear(
            heads * d, h, bias=config.proj_bias, init_std=scaled_init_std(config.init_std, config.num_layers),
            shard=shard, what=f"layer {layer}: attention heads x head_dim",
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        index: LayerIndices | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if index is None:
            heads, groups = self.layout.num_heads, self.layout.num_groups
        else:
            heads, groups = index.num_heads, index.num_groups
        if heads == 0:  # this rank's shard keeps no head: it adds zeros to the projection's all-reduce, and
            # (through the copy) zeros to the all-reduce of the QKV input's gradient the other ranks run in backward
            out = copy_to_tensor_model_parallel_region(x)[..., :0]
        else:
            qkv = self.linear_qkv(x, rows=None if index is None else index.qkv_rows, cols=hidden)
            per_group = heads // groups
            q, k, v = QKVLayout.unpack(qkv, groups, per_group, self.head_dim)
            if self.recompute_core and recomputing(self):
                out = checkpointed(core_attention, q, k, v, cos, sin)
            else:
                out = core_attention(q, k, v, cos, sin)
        return self.linear_proj(out, rows=hidden, cols=None if index is None else index.proj_cols)


class MLP(nn.Module):
    """fc1 (and gate) column-parallel over the MLP neurons, fc2 row-parallel. fc1 and gate read one input,
    copied into the tensor-parallel region once (one all-reduce of its gradient, as Megatron's fused fc1)."""

    def __init__(self, config: ModelConfig, layer: int, shard: TPShard):
        super().__init__()
        h, ffn = config.hidden_size, config.layer_ffn(layer)
        what = f"layer {layer}: ffn_hidden_size"
        self.act = _ACTIVATIONS[config.activation]
        column = dict(bias=config.mlp_bias, init_std=config.init_std, copy_input=False, shard=shard, what=what)
        self.linear_fc1 = ColumnParallelLinear(h, ffn, **column)
        self.linear_gate = ColumnParallelLinear(h, ffn, **column) if config.gated_mlp else None
        self.linear_fc2 = RowParallelLinear(
            ffn, h, bias=config.mlp_bias, init_std=scaled_init_std(config.init_std, config.num_layers), shard=shard,
            what=what,
        )  # fmt: skip

    def forward(
        self, x: torch.Tensor, index: LayerIndices | None = None, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        neurons = None if index is None else index.mlp_rows
        x = copy_to_tensor_model_parallel_region(x)
        up = self.linear_fc1(x, rows=neurons, cols=hidden)
        if self.linear_gate is not None:
            up = self.act(self.linear_gate(x, rows=neurons, cols=hidden)) * up
        else:
            up = self.act(up)
        return self.linear_fc2(up, rows=hidden, cols=neurons)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, shard: TPShard):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer, shard)
        self.pre_mlp_layernorm = make_norm(config)
        self.mlp = MLP(config, layer, shard)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        index: LayerIndices | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(x, hidden), cos, sin, index, hidden)
        if self.parallel_residual:
            return x + attn + self.mlp(self.pre_mlp_layernorm(x, hidden), index, hidden)
        x = x + attn
        return x + self.mlp(self.pre_mlp_layernorm(x, hidden), index, hidden)


class Layers(nn.ModuleDict):
    """Transformer layers keyed by their GLOBAL index (state-dict names ``layers.{i}.``), of which a pipeline
    stage holds a contiguous run. Indexing by an int is by global index; iteration yields the layers in order."""

    def __getitem__(self, key):
        if isinstance(key, slice):
            return list(self.values())[key]
        return super().__getitem__(str(key))

    def __iter__(self):
        return iter(self.values())

    def indices(self) -> list[int]:
        return [int(k) for k in self.keys()]


class GPTModel(nn.Module):
    """Embedding, transformer layers, final norm and the (tied or untied) output layer.

    Under tensor parallelism (``shard``, default: this rank's place in the TP group) every layer holds its
    shard, and the logits come out split over the vocabulary: ``[batch, seq, vocab / TP]``, this rank's
    ids ``[rank * vocab / TP, (rank + 1) * vocab / TP)`` (``parallel.losses`` works on them as they are;
    ``gather_from_tensor_model_parallel_region`` joins them).

    A pipeline ``stage`` (default: the whole model) holds only its layers (global numbering), the embedding
    on the first stage, the final norm and output layer on the last; with tied embeddings the last stage
    holds its own copy of the embedding (Megatron's scheme; the trainer keeps the two copies' gradients
    summed). A first stage takes tokens, later ones the previous stage's hidden states; a last stage
    returns logits, earlier ones hidden states. A stage of the interleaved schedule holds several model
    chunks (``PipelineStage.chunks``) and runs one per call (``model(x, chunk=c)``); its state-dict names are
    the same global ``layers.{i}.`` ones, so checkpoints and converters see one naming.

    ``set_recompute`` turns on activation recomputation for training forwards.
    """

    recompute_granularity: str | None = None  # None, "full" or "selective" (set_recompute)

    def __init__(self, config: ModelConfig, shard: TPShard | None = None, stage: PipelineStage | None = None):
        super().__init__()
        self.config = config
        self.shard = shard or TPShard.current()
        self.stage = stage or PipelineStage.whole(config.num_layers)
        tied = config.tie_word_embeddings
        self.embedding = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, init_std=config.init_std, shard=self.shard)
            if self.stage.first or (self.stage.last and tied)
            else None
        )
        self.layers = Layers({str(i): TransformerLayer(config, i, self.shard) for i in self.stage.layers})
        self.final_layernorm = make_norm(config) if self.stage.last else None
        self.output_layer = (
            ColumnParallelLinear(
                config.hidden_size, config.vocab_size, bias=False, init_std=config.init_std, shard=self.shard,
                what="vocab_size",
            )  # fmt: skip
            if self.stage.last and not tied
            else None
        )
        if tied and self.stage.last and not self.stage.first:
            self.embedding.weight.ds_pipe_replicated = True  # DeepSpeed's gradient norm counts it once

    def forward(
        self, inputs: torch.Tensor, subnet: SubnetConfig | SubnetIndices | None = None, chunk: int | None = None
    ) -> torch.Tensor:
        """This rank's logits ``[batch, seq, vocab / TP]`` of the whole model, or of ``subnet`` run on these
        weights (given in parent indices; each rank computes with the part on its shard and its stage).
        ``inputs``: tokens ``[batch, seq]`` on the first stage, hidden states ``[batch, seq, hidden]`` after.
        ``chunk``: which of the stage's model chunks runs (interleaved schedule; needed when it holds several)."""
        if chunk is None and self.stage.num_chunks > 1:
            raise ValueError(f"this pipeline stage holds {self.stage.num_chunks} model chunks: pass chunk=")
        chunk = chunk or 0
        first, last = self.stage.holds_first(chunk), self.stage.holds_last(chunk)
        index = (
            subnet_indices(self.config, subnet, inputs.device, self.shard)
            if isinstance(subnet, SubnetConfig)
            else subnet
        )
        hidden = None if index is None else index.hidden
        cos, sin = rotary_cos_sin(self.config, inputs.shape[1], inputs.device)
        x = self.embedding(inputs, cols=hidden) if first else inputs
        held = self.stage.chunk_layers(chunk)
        if index is None:
            for i in held:
                x = self.run_layer(self.layers[i], x, cos, sin)
        else:
            for i, layer_index in zip(index.layers, index.per_layer):
                if i in held:
                    x = self.run_layer(self.layers[i], x, cos, sin, layer_index, hidden)
        if not last:
            return x
        x = self.final_layernorm(x, hidden)
        if self.output_layer is None:
            return self.embedding_logits(x, hidden)
        return self.output_layer(x, cols=hidden)

    def set_recompute(self, granularity: str | None) -> GPTModel:
        """Megatron's activation recomputation in training forwards (eval and ``no_grad`` run as they are):
        ``"full"`` keeps only each layer's input and re-runs the layer in backward; ``"selective"`` re-runs
        only the core attention (``core_attention``); ``None`` keeps every activation. Returns the model."""
        if granularity is not None and granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(
                f"--recompute-granularity {granularity!r}: expected one of {', '.join(RECOMPUTE_GRANULARITIES)}"
            )
        self.recompute_granularity = granularity
        for layer in self.layers:
            layer.self_attention.recompute_core = granularity == "selective"
        return self

    def run_layer(self, layer: nn.Module, *args) -> torch.Tensor:
        """``layer(*args)``, under full recomputation a checkpoint of it (a compiled layer included)."""
        if getattr(layer, "_compiled_call_impl", None) is not None and self.shard.size > 1 and keeps_nothing(*args):
            layer = layer._call_impl  # eager (hooks included): see compile.py on shards that keep nothing
        if self.recompute_granularity == "full" and recomputing(self):
            return checkpointed(layer, *args, replay_all=self.shard.size > 1)
        return layer(*args)

    def embedding_logits(self, x: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """Logits through the tied embedding (this rank's vocabulary rows)."""
        weight = self.embedding.weight if hidden is None else self.embedding.weight.index_select(1, hidden)
        return F.linear(copy_to_tensor_model_parallel_region(x), weight)
