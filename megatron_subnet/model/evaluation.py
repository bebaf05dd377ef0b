"""Language-model loss and perplexity of a model (ours, dense or masked, or transformers') on token batches.

Batches are token tensors ``[batch, seq + 1]``: inputs ``[:, :-1]``, labels ``[:, 1:]``. The loss is the
fp32 cross-entropy averaged over every label token of every batch (token-weighted: batches of different
sizes count by their tokens). ``evaluate`` is the one evaluation loop: ``tools/evaluate.py``, the search
fitness, importance's drop loss (through ``lm_loss``) and the trainer's validation all use it.

Under tensor parallelism our model's logits are this rank's vocabulary slice; ``lm_loss`` is
``parallel.losses.cross_entropy``, which takes such slices (no rank builds a whole-vocabulary row) and
gives the same value on every rank. With one tensor-parallel rank it is the plain cross-entropy, so
transformers' full-vocabulary logits go through it too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

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
    quiet = (not progress if progress is not None else None) if parallel_state.get_rank() == 0 else True
    bar = tqdm(batches, desc=desc, unit="batch", disable=quiet)
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
    """This rank's tensor-parallel shard of our GPTModel from our checkpoint directory (only the shard is
    read), a Hugging Face directory or a ``.gguf`` file (read whole by transformers, then sharded)."""
    if checkpoint_kind(path) == "ours":
        return load_model(path, device)
    from megatron_subnet.model.hf import load_hf

    config, state = load_hf(path)
    shard = TPShard.current()
    try:
        state = shard_state_dict(config, state, shard)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model_from_state(config, state, device, shard)


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
