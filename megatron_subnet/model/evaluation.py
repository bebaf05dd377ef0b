"""Language-model loss and perplexity of a model (ours, dense or masked, or transformers') on token batches.

Batches are token tensors ``[batch, seq + 1]``: inputs ``[:, :-1]``, labels ``[:, 1:]``. The loss is the
fp32 cross-entropy averaged over every label token of every batch (token-weighted: batches of different
sizes count by their tokens). ``loss_sum`` is the one loop for our models in every layout (whole, a
tensor-parallel shard, one pipeline stage of one or several model chunks; dense or a masked sub-network):
the trainer's validation, the search fitness, importance's drop loss and ``tools/evaluate.py`` (through
``evaluate_model``) use it. ``evaluate`` scores any other forward (transformers') by the same definition.

Under tensor parallelism our model's logits are this rank's vocabulary slice; ``lm_loss`` is
``parallel.losses.cross_entropy``, which takes such slices (no rank builds a whole-vocabulary row) and
gives the same value on every rank. With one tensor-parallel rank it is the plain cross-entropy, so
transformers' full-vocabulary logits go through it too.

Under pipeline parallelism each rank holds one stage (``GPTModel(..., stage=...)``): every micro-batch goes
through the stages (``parallel.pipeline_executor.forward_only``; a masked candidate's hidden states are
``[batch, seq, len(subnet.hidden)]`` between stages), the last stage sums the vocab-parallel cross-entropy
batch by batch exactly as ``evaluate`` does, and the sum is broadcast from the last stage, so every rank
returns the same ``EvalResult`` as a single process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_subnet.model.shapes import expected_shapes
from megatron_subnet.model.weights import (
    CONFIG_NAME,
    CheckpointError,
    load_checkpoint,
    load_model,
    model_from_state,
    shard_state_dict,
)
from megatron_subnet.parallel import state as parallel_state
from megatron_subnet.parallel.layers import TPShard
from megatron_subnet.parallel.losses import cross_entropy
from megatron_subnet.parallel.pipeline import current_stage
from megatron_subnet.parallel.pipeline_executor import Messages, broadcast_from_last_stage, forward_only

Forward = Callable[[torch.Tensor], torch.Tensor]  # tokens [batch, seq] -> logits [batch, seq, vocab (/ TP)]


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per token (nats)
    tokens: int  # label tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32 (``labels`` already shifted), mean or ``"sum"`` over tokens.

    ``logits [batch, seq, vocab]``: under tensor parallelism this rank's vocabulary slice (our model's
    output as it comes); the vocab-parallel ``cross_entropy`` gives every rank the same value."""
    return cross_entropy(logits.reshape(-1, *logits.shape[-2:]), labels.reshape(-1, labels.shape[-1]), reduction)


@torch.no_grad()
def evaluate(
    forward: Forward, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu",
    desc: str = "eval", progress: bool | None = None,
) -> EvalResult:
    """Token-weighted mean loss of ``forward`` over ``batches``: the summed cross-entropy of every label token
    divided by their number. ``progress=None``: a bar only on a terminal (and only on global rank 0);
    ``False``: silent."""
    total, tokens = 0.0, 0
    bar = tqdm(batches, desc=desc, unit="batch", disable=_quiet(progress))
    for batch in bar:
        batch = batch.to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        total += float(lm_loss(forward(inputs), labels, reduction="sum"))
        tokens += labels.numel()
        if not bar.disable:
            bar.set_postfix(loss=f"{total / tokens:.4f}")
    if tokens == 0:
        raise ValueError("no evaluation batches")
    return EvalResult(total / tokens, tokens)


def _quiet(progress: bool | None) -> bool | None:
    return (not progress if progress is not None else None) if parallel_state.get_rank() == 0 else True


def evaluate_model(
    model, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu", subnet=None,
    desc: str = "eval", progress: bool | None = None,
) -> EvalResult:
    """``evaluate``'s token-weighted loss of our GPTModel, dense or the masked ``subnet`` (a SubnetConfig or
    SubnetIndices, parent indices), whether ``model`` is the whole model, a tensor-parallel shard of it, or
    one pipeline stage: every rank returns the same result."""
    from megatron_subnet.model.subnet import SubnetConfig, subnet_indices

    index = subnet_indices(model.config, subnet, device, model.shard) if isinstance(subnet, SubnetConfig) else subnet
    batches = list(batches)
    if not batches:
        raise ValueError("no evaluation batches")
    with tqdm(total=len(batches), desc=desc, unit="batch", disable=_quiet(progress)) as bar:
        total, tokens = loss_sum(model, batches, device, index, bar)
    total = float(broadcast_from_last_stage(torch.tensor([total], dtype=torch.float64, device=device)))
    return EvalResult(total / tokens, tokens)


@torch.no_grad()
def loss_sum(
    model, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu", index=None, bar=None, call=None
) -> tuple[float, int]:
    """(summed cross-entropy on the last stage, 0.0 on the others; label tokens) of ``batches`` through our
    ``model`` (this rank's shard of its pipeline stage, which may hold several model chunks) in the
    forward-only schedule: one loop for every layout, one process included. ``index``: a masked
    sub-network's SubnetIndices; ``bar``: a tqdm bar advanced per batch; ``call``: what runs the model
    (default ``model``; the trainer passes its DeepSpeed engine)."""
    call = model if call is None else call
    batches = [b.to(device) for b in batches]
    stage = model.stage
    width = model.config.hidden_size if index is None or index.hidden is None else len(index.hidden)
    dtype = next(model.parameters()).dtype
    sums: list[float] = []

    def forward(chunk: int, i: int, received):
        inputs, labels = batches[i][:, :-1], batches[i][:, 1:]
        result = call(inputs if stage.holds_first(chunk) else received[0], subnet=index, chunk=chunk)
        if bar is not None and chunk == stage.num_chunks - 1:
            bar.update()
        if not stage.holds_last(chunk):
            return [result]
        sums.append(float(lm_loss(result, labels, reduction="sum")))
        return None

    start = 0
    while start < len(batches):  # runs of equally shaped batches: the message shape follows the batch
        end = start + 1
        while end < len(batches) and batches[end].shape == batches[start].shape:
            end += 1
        b, t = batches[start].shape[0], batches[start].shape[1] - 1
        forward_only(end - start, stage.num_chunks, lambda c, i, received, s=start: forward(c, s + i, received),
                     Messages([((b, t, width), dtype)]), device)  # fmt: skip
        start = end
    total = 0.0
    for value in sums:  # the same float additions, in the same order, as evaluate()
        total += value
    return total, sum(batch[:, 1:].numel() for batch in batches)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"ours"`` (model_config.json), ``"hf"`` (config.json) or ``"gguf"``; CheckpointError otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if (path / CONFIG_NAME).is_file():
        return "ours"
    if (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(f"{path}: not a checkpoint (no {CONFIG_NAME}, no config.json, not a .gguf file)")


def load_any(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """This rank's tensor-parallel shard and pipeline stage (layers split evenly) of our GPTModel from our
    checkpoint directory (only that part is read), a Hugging Face directory or a ``.gguf`` file (read whole
    by transformers, then cut)."""
    if checkpoint_kind(path) == "ours":
        return load_model(path, device)
    from megatron_subnet.model.hf import load_hf

    config, state = load_hf(path)
    shard = TPShard.current()
    try:
        stage = current_stage(config.num_layers)
        state = shard_state_dict(config, state, shard)
        state = {name: state[name] for name in expected_shapes(config, shard, stage) if name in state}
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model_from_state(config, state, device, shard, stage)


def load_transformers(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """transformers' own ``AutoModelForCausalLM`` (fp32, eval) for a HF directory, a ``.gguf`` file, or our
    checkpoint (written to a temporary HF directory first)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    kind = checkpoint_kind(path)
    path = Path(path)
    kwargs = dict(dtype=torch.float32, local_files_only=True)
    try:
        if kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        elif kind == "hf":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            from megatron_subnet.model.hf import save_hf

            config, state = load_checkpoint(path)
            with tempfile.TemporaryDirectory() as tmp:
                save_hf(Path(tmp) / "hf", config, state)
                model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: transformers cannot load it ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def transformers_forward(model) -> Forward:
    return lambda tokens: model(input_ids=tokens, use_cache=False).logits
