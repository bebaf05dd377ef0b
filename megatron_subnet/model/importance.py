"""Minitron-style activation importance of a parent's layers, hidden channels, heads, query groups and neurons.

One dense forward per calibration batch, watched by forward hooks (``gpt.py`` is unchanged):

- heads: L2 norm of each head's attention output (the input of ``linear_proj``) over batch x seq x
  head_dim, averaged over batches; a query group scores the sum of its heads;
- MLP neurons: mean |activation| of the MLP intermediate (``act(gate) * up``, the input of ``linear_fc2``);
- hidden channels: mean |output| of every norm (both norms of each layer and the final norm), summed;
- layers, two ways: ``block`` importance, 1 - cosine(layer input, layer output) averaged over tokens
  (ShortGPT's BI), and ``drop_loss``, the LM loss with that one layer left out minus the full model's.

The FLOPs run (``model/flops.py``'s count, every rank together) are kept in the metadata: ``calibration_flops``
(the parent's forward on every calibration token), ``drop_loss_flops`` (each dropped layer's evaluation
counted: in one process the layers after it and the output layer from its recorded input, per drop-loss
token; through pipeline stages the whole model without it) and their sum ``flops``.

Higher is more important everywhere. ``Importance`` implements ``subnet.ImportanceScores``; its
``layer_metric`` picks which layer score ``.layers`` returns. Saved as safetensors with metadata.

Under tensor parallelism every TP rank runs the same batches on its shard: its hooks see only its own
heads and MLP neurons (a contiguous block of the global numbering), which are all-gathered over the TP
group into the global vectors; norm outputs and layer inputs/outputs are replicated, so hidden-channel
and block scores are taken as they are, and the drop loss uses the vocab-parallel cross-entropy. The
scores equal a single process's (up to float rounding) and every rank holds them.

Under pipeline parallelism each stage's hooks see only its layers: per-layer statistics (heads, neurons,
block importance) come from the stage holding the layer, the hidden-channel statistics are the sums over
each stage's norms, and both are summed over the pipeline group (one all-reduce; a stage contributes zeros
for the layers it does not hold). The calibration forward runs through the stages (forward-only schedule),
and the drop loss of layer ``i`` is the loss of the masked model without layer ``i``, one full pipelined
forward per layer, summed on the last stage. Every rank again holds the single process's scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.evaluation import lm_loss, loss_sum
from megatron_subnet.model.flops import forward_flops_per_token, layer_linear_flops_per_token, logits_flops_per_token
from megatron_subnet.model.gpt import GPTModel, rotary_cos_sin
from megatron_subnet.outputs import write_file_atomically
from megatron_subnet.parallel import mappings
from megatron_subnet.parallel import state as parallel_state

LAYER_METRICS = ("block", "drop_loss")
FORMAT_VERSION = "1"


class ImportanceError(ValueError):
    """Importance scores that are unreadable, incomplete or do not fit the parent."""


def config_hash(config: ModelConfig) -> str:
    """A short sha256 of the architecture (stored with the scores, for information)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Importance:
    """Importance scores of one parent (higher = more important); implements ``ImportanceScores``."""

    hidden: torch.Tensor  # [hidden]
    heads: list[torch.Tensor]  # per layer [heads]
    query_groups: list[torch.Tensor]  # per layer [groups]
    mlp: list[torch.Tensor]  # per layer [ffn]
    block: torch.Tensor  # [layers]
    drop_loss: torch.Tensor | None = None  # [layers], None when not computed
    layer_metric: str = "block"
    metadata: dict[str, str] = field(default_factory=dict)  # num_tokens, parent_config_sha256, ...

    def __post_init__(self) -> None:
        if self.layer_metric not in LAYER_METRICS:
            raise ImportanceError(f"layer_metric {self.layer_metric!r}: expected one of {', '.join(LAYER_METRICS)}")
        if self.layer_metric == "drop_loss" and self.drop_loss is None:
            raise ImportanceError("layer_metric 'drop_loss': these scores hold no drop-loss layer scores")

    @property
    def layers(self) -> torch.Tensor:
        """Layer scores of the chosen ``layer_metric``."""
        return self.block if self.layer_metric == "block" else self.drop_loss

    def with_layer_metric(self, layer_metric: str) -> Importance:
        return dataclasses.replace(self, layer_metric=layer_metric)

    def check(self, parent: ModelConfig) -> None:
        """Raise ImportanceError when the score shapes do not fit ``parent``."""
        n = parent.num_layers
        expected = {"hidden": [parent.hidden_size], "block": [n], "drop_loss": [n]}
        for i in range(n):
            expected[f"heads.{i}"] = [parent.layer_heads(i)]
            expected[f"query_groups.{i}"] = [parent.layer_query_groups(i)]
            expected[f"mlp.{i}"] = [parent.layer_ffn(i)]
        tensors = self._tensors()
        names = set(expected) - (set() if self.drop_loss is not None else {"drop_loss"})
        if set(tensors) != names:
            raise ImportanceError(f"scores are for a {len(self.block)}-layer parent, this one has {n} layers")
        for name in sorted(names):
            if list(tensors[name].shape) != expected[name]:
                raise ImportanceError(
                    f"scores {name} have shape {list(tensors[name].shape)}, the parent needs {expected[name]}"
                )

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"hidden": self.hidden, "block": self.block}
        if self.drop_loss is not None:
            out["drop_loss"] = self.drop_loss
        for name in ("heads", "query_groups", "mlp"):
            for i, t in enumerate(getattr(self, name)):
                out[f"{name}.{i}"] = t
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically) with the scores and string metadata."""
        meta = {k: str(v) for k, v in self.metadata.items()}
        meta.update(format_version=FORMAT_VERSION, layer_metric=self.layer_metric, num_layers=str(len(self.block)))
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self._tensors().items()}
        write_file_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def check_finite(self) -> None:
        """ImportanceError naming the scores that hold NaN or infinity (nothing useful was computed)."""
        bad = sorted(name for name, t in self._tensors().items() if not torch.isfinite(t).all())
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ImportanceError(
                f"the scores of {shown} are not finite (NaN or infinity: the model's activations overflowed "
                "or its weights hold NaN)"
            )


def save_importance(importance: Importance, path: str | os.PathLike) -> None:
    importance.save(path)


def load_importance(
    path: str | os.PathLike, layer_metric: str | None = None, parent: ModelConfig | None = None
) -> Importance:
    """Read scores saved by ``save_importance``; ``layer_metric`` overrides the saved choice."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ImportanceError(f"{path}: cannot read importance scores ({str(e).splitlines()[0]})") from None
    try:
        n = int(meta.pop("num_layers"))
        saved_metric = meta.pop("layer_metric")
        meta.pop("format_version")
        importance = Importance(
            hidden=tensors["hidden"],
            heads=[tensors[f"heads.{i}"] for i in range(n)],
            query_groups=[tensors[f"query_groups.{i}"] for i in range(n)],
            mlp=[tensors[f"mlp.{i}"] for i in range(n)],
            block=tensors["block"],
            drop_loss=tensors.get("drop_loss"),
            layer_metric=layer_metric or saved_metric,
            metadata=meta,
        )
    except (KeyError, ValueError) as e:
        raise ImportanceError(f"{path}: not an importance file ({type(e).__name__}: {e})") from None
    except ImportanceError as e:
        raise ImportanceError(f"{path}: {e}") from None
    if parent is not None:
        try:
            importance.check(parent)
        except ImportanceError as e:
            raise ImportanceError(f"{path}: {e}") from None
    return importance


# ----------------------------------------------------------------------------- computing


class _Recorder:
    """Forward hooks on a dense GPTModel (or one pipeline stage of it) that sum the activation statistics of
    each batch, per layer in GLOBAL layer numbering (a stage records only the layers it holds)."""

    def __init__(self, model: GPTModel):
        self.model = model
        n = model.config.num_layers
        zeros = lambda size: torch.zeros(size, dtype=torch.float64)  # noqa: E731
        # this tensor-parallel rank's heads and neurons (all of them with one rank), by global layer index
        self.heads = {i: zeros(layer.self_attention.layout.num_heads) for i, layer in zip(model.layers.indices(),
                                                                                         model.layers)}  # fmt: skip
        self.mlp = {i: zeros(layer.mlp.linear_fc2.in_per_rank) for i, layer in zip(model.layers.indices(),
                                                                                   model.layers)}  # fmt: skip
        self.hidden = zeros(model.config.hidden_size)
        self.block = zeros(n)
        self.layer_inputs: list[torch.Tensor | None] = [None] * n
        self.keep_inputs = False  # keep each layer's input (for the drop loss)
        self.recording = True  # off while the layer-dropped runs reuse the layers
        self.handles: list = []

    def __enter__(self) -> _Recorder:
        norms: list[nn.Module] = [self.model.final_layernorm] if self.model.final_layernorm is not None else []
        for i, layer in zip(self.model.layers.indices(), self.model.layers):
            norms += [layer.input_layernorm, layer.pre_mlp_layernorm]
            self.handles += [
                layer.self_attention.linear_proj.register_forward_pre_hook(self._head_hook(i)),
                layer.mlp.linear_fc2.register_forward_pre_hook(self._mlp_hook(i)),
                layer.register_forward_hook(self._layer_hook(i)),
            ]
        self.handles += [norm.register_forward_hook(self._norm_hook) for norm in norms]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _head_hook(self, i: int):
        def hook(module, args):
            if not self.recording:
                return
            x = args[0].float()
            b, t, _ = x.shape
            self.heads[i] += x.view(b, t, len(self.heads[i]), -1).pow(2).sum((0, 1, 3)).sqrt().double().cpu()
        return hook

    def _mlp_hook(self, i: int):
        def hook(module, args):
            if self.recording:
                self.mlp[i] += args[0].float().abs().sum((0, 1)).double().cpu()
        return hook

    def _norm_hook(self, module, args, output):
        if self.recording:
            self.hidden += output.float().abs().sum((0, 1)).double().cpu()

    def _layer_hook(self, i: int):
        def hook(module, args, output):
            if not self.recording:
                return
            x = args[0]
            self.block[i] += (1 - F.cosine_similarity(x.float(), output.float(), dim=-1)).sum().double().cpu()
            self.layer_inputs[i] = x if self.keep_inputs else None
        return hook


def _logits_from(model: GPTModel, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Run the dense layers ``start..`` and the output head on hidden states ``x`` (GPTModel.forward's tail)."""
    for layer in model.layers[start:]:
        x = layer(x, cos, sin)
    x = model.final_layernorm(x)
    return model.embedding_logits(x, None) if model.output_layer is None else model.output_layer(x)


def _gather_tp(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The global score vector from every tensor-parallel rank's block of it (rank order: global numbering)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return local
    return mappings.all_gather_last_dim(local.to(device)).cpu()  # on the model's device: NCCL needs CUDA tensors


def _sum_over_pipeline(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``parts`` summed over the stages of this rank's pipeline (one all-reduce of their concatenation): a
    statistic only one stage holds comes out as that stage's (the others add zeros), one every stage holds
    part of (the norms of the hidden channels) as the sum of the parts."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return parts
    flat = torch.cat([p.reshape(-1) for p in parts]).to(device)
    torch.distributed.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    return list(flat.cpu().split([p.numel() for p in parts]))


def _layer_flops_per_token(config: ModelConfig, i: int, seq_length: int) -> int:
    """Forward FLOPs per token of layer ``i`` (weight matmuls and the dense attention core, as ``flops.py``)."""
    core = 4 * config.layer_heads(i) * config.head_dim * seq_length  # Q K^T and A V: flops.attention_core_...
    return int(layer_linear_flops_per_token(config, i)) + core


def drop_loss_flops_per_token(config: ModelConfig, seq_length: int, pipelined: bool = False) -> int:
    """Forward FLOPs per drop-loss token of all ``num_layers`` layer-dropped evaluations together: in one
    process layer ``i``'s runs layers ``i+1..`` and the output layer (from layer ``i``'s recorded input);
    through pipeline stages it is the whole model without layer ``i``."""
    n = config.num_layers
    layers = [_layer_flops_per_token(config, i, seq_length) for i in range(n)]
    logits = int(logits_flops_per_token(config))
    if pipelined:
        return sum(sum(layers) - layers[i] + logits for i in range(n))
    return sum(sum(layers[i + 1 :]) + logits for i in range(n))


def _drop_layer_losses(model: GPTModel, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pipeline stages: the summed cross-entropy of the masked model without layer ``i`` for every ``i`` (each
    one full forward through the stages), on the last stage (zeros on the others)."""
    from megatron_subnet.model.subnet import SubnetConfig, subnet_indices

    c = model.config
    full = SubnetConfig.full(c)
    out = torch.zeros(c.num_layers, dtype=torch.float64)
    for i in range(c.num_layers):
        keep = [j for j in range(c.num_layers) if j != i]
        dropped = SubnetConfig(layers=keep, hidden=full.hidden, heads=[full.heads[j] for j in keep],
                               query_groups=[full.query_groups[j] for j in keep],
                               mlp=[full.mlp[j] for j in keep])  # fmt: skip
        index = subnet_indices(c, dropped, device, model.shard)
        out[i] = loss_sum(model, [batch], device, index)[0]
    return out


@torch.no_grad()
def compute_importance(
    model: GPTModel,
    batches: Sequence[torch.Tensor],
    drop_loss_iters: int | None = None,
    layer_metric: str = "block",
    progress: bool | None = None,
) -> Importance:
    """Scores from calibration ``batches`` of tokens ``[batch, seq + 1]`` (inputs ``[:, :-1]``, labels ``[:, 1:]``).

    The drop loss uses the first ``drop_loss_iters`` batches (None: all; 0: not computed). Leaving out
    layer ``i`` changes nothing before it, so its loss runs layers ``i+1..`` from layer ``i``'s recorded
    input: the same number as the masked model without layer ``i``, at about half the cost. ``model`` may
    be one pipeline stage (every stage of the pipeline calls this with the same batches): the forward runs
    through the stages and the drop loss of each layer is one masked pipelined forward.
    """
    if not batches:
        raise ImportanceError("no calibration batches")
    drop_iters = len(batches) if drop_loss_iters is None else min(drop_loss_iters, len(batches))
    was_training = model.training
    model.eval()
    c = model.config
    device = next(model.parameters()).device
    pipelined = not (model.stage.first and model.stage.last)
    tokens_seen = drop_tokens = 0
    calibration_flops = drop_flops = 0
    drop_loss = torch.zeros(c.num_layers, dtype=torch.float64)
    quiet = (None if progress is None else not progress) if parallel_state.get_rank() == 0 else True
    bar = tqdm(batches, desc="importance", unit="batch", disable=quiet)
    with _Recorder(model) as rec:
        for step, batch in enumerate(bar):
            batch = batch.to(device)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            rec.keep_inputs = step < drop_iters and not pipelined
            if pipelined:  # the dense forward through the stages; the last stage holds the summed loss
                base = loss_sum(model, [batch], device)[0]
            else:
                logits = model(inputs)
            tokens_seen += inputs.numel()
            calibration_flops += int(forward_flops_per_token(c, inputs.shape[1])) * inputs.numel()
            if step >= drop_iters:
                continue
            rec.recording = False
            if pipelined:
                if model.stage.last:
                    drop_loss += _drop_layer_losses(model, batch, device) - base
                else:
                    _drop_layer_losses(model, batch, device)
            else:
                # token-weighted, as evaluation.evaluate: summed cross-entropy, divided by the label tokens at the end
                base = float(lm_loss(logits, labels, reduction="sum"))
                del logits
                cos, sin = rotary_cos_sin(c, inputs.shape[1], inputs.device)
                for i in range(c.num_layers):
                    logits = _logits_from(model, rec.layer_inputs[i], i + 1, cos, sin)
                    drop_loss[i] += float(lm_loss(logits, labels, reduction="sum")) - base
                rec.layer_inputs = [None] * c.num_layers
            rec.recording = True
            drop_tokens += labels.numel()
            drop_flops += drop_loss_flops_per_token(c, inputs.shape[1], pipelined) * labels.numel()
    model.train(was_training)
    counts = {"num_tokens": tokens_seen, "num_batches": len(batches), "drop_loss_tokens": drop_tokens,
              "calibration_flops": calibration_flops, "drop_loss_flops": drop_flops}  # fmt: skip
    return _scores(model, rec, drop_loss if drop_iters else None, counts, layer_metric, batches[0].shape[1] - 1)


def _scores(model: GPTModel, rec: _Recorder, drop_loss: torch.Tensor | None, counts: dict[str, int],
            layer_metric: str, seq_length: int) -> Importance:  # fmt: skip
    """The Importance of what ``rec`` recorded over ``counts["num_batches"]`` batches: this stage's layers
    summed over the pipeline (global vectors after the tensor-parallel gather), means per token or batch."""
    c, device = model.config, next(model.parameters()).device
    tokens, n = counts["num_tokens"], c.num_layers
    per_group = [c.layer_heads(i) // c.layer_query_groups(i) for i in range(n)]
    heads = [_gather_tp(rec.heads[i], device) if i in rec.heads else torch.zeros(c.layer_heads(i), dtype=torch.float64)
             for i in range(n)]  # fmt: skip
    mlp = [_gather_tp(rec.mlp[i], device) if i in rec.mlp else torch.zeros(c.layer_ffn(i), dtype=torch.float64)
           for i in range(n)]  # fmt: skip
    drops = torch.zeros(n, dtype=torch.float64) if drop_loss is None else drop_loss
    hidden, block, drops, *per_layer = _sum_over_pipeline([rec.hidden, rec.block, drops, *heads, *mlp], device)
    heads = [(h / counts["num_batches"]).float() for h in per_layer[:n]]
    return Importance(
        hidden=(hidden / tokens).float(),
        heads=heads,
        query_groups=[h.view(-1, g).sum(1) for h, g in zip(heads, per_group)],
        mlp=[(m / tokens).float() for m in per_layer[n:]],
        block=(block / tokens).float(),
        drop_loss=(drops / counts["drop_loss_tokens"]).float() if drop_loss is not None else None,
        layer_metric=layer_metric,
        metadata={
            **{k: str(v) for k, v in counts.items()},
            "flops": str(counts["calibration_flops"] + counts["drop_loss_flops"]),
            "seq_length": str(seq_length),
            "parent_config_sha256": config_hash(c),
            "parent_shape": json.dumps({
                "num_layers": c.num_layers, "hidden_size": c.hidden_size,
                "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_query_groups,
                "ffn_hidden_size": c.ffn_hidden_size,
            }),
        },
    )
