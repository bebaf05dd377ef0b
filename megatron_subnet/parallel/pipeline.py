"""Pipeline parallelism's layout: which layers each (virtual) stage holds.

The schedules are order lists (``pipeline_orders``) run by one executor (``pipeline_executor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_subnet.parallel import state


class PipelineError(ValueError):
    """A pipeline layout that cannot be built (names the flag and the sizes)."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


@dataclass(frozen=True)
class PipelineStage:
    """The GLOBAL layer indices a stage holds, and whether it holds the first / last (virtual) stage.

    Under the interleaved schedule a stage holds several model ``chunks``, one contiguous run of layers each:
    chunk ``c`` of pipeline rank ``r`` is virtual stage ``c * PP + r``, so ``layers`` is not contiguous then
    (8 layers, PP=2, 2 chunks: rank 0 holds 0, 1 and 4, 5). ``chunks`` empty: one chunk, ``layers``."""

    layers: tuple[int, ...]
    first: bool = True
    last: bool = True
    chunks: tuple[tuple[int, ...], ...] = ()

    @staticmethod
    def whole(num_layers: int) -> PipelineStage:
        return PipelineStage(tuple(range(num_layers)), True, True)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks) or 1

    def chunk_layers(self, chunk: int) -> tuple[int, ...]:
        return self.chunks[chunk] if self.chunks else self.layers

    def holds_first(self, chunk: int) -> bool:
        """Whether ``chunk`` is virtual stage 0: it embeds the tokens."""
        return self.first and chunk == 0

    def holds_last(self, chunk: int) -> bool:
        """Whether ``chunk`` is the last virtual stage: the final norm, the output layer and the loss."""
        return self.last and chunk == self.num_chunks - 1


def split_layers(
    num_layers: int,
    stages: int,
    split: Sequence[int] | None = None,
    first: int | None = None,
    last: int | None = None,
    chunks: int = 1,
) -> list[int]:
    """Layers per stage (per virtual stage, ``stages * chunks`` of them, with ``chunks`` model chunks per stage):
    ``split`` as given, or ``first``/``last`` fixed and the rest even, or all even (earlier stages take one
    more when they do not divide: 17 over 2 stages is 9 + 8)."""
    what = f"--pipeline-model-parallel-size {stages}"
    if chunks > 1:
        what += f" x --virtual-pipeline-model-parallel-size {chunks}"
        if first or last:
            raise PipelineError(
                "--decoder-first/last-pipeline-num-layers: not supported with --virtual-pipeline-model-parallel-size;"
                " give --pipeline-layer-split with a count per virtual stage instead"
            )
    stages *= chunks
    if stages > num_layers:
        raise PipelineError(f"{what}: more stages than the {num_layers} layers")
    if split is not None:
        if len(split) != stages or any(n < 1 for n in split) or sum(split) != num_layers:
            per = "virtual stage" if chunks > 1 else "stage"
            raise PipelineError(
                f"--pipeline-layer-split {','.join(map(str, split))}: needs {stages} positive counts (one per {per}) "
                f"summing to the {num_layers} layers"
            )
        return list(split)
    fixed = {0: first, stages - 1: last}
    if stages == 1 and (first or last):
        raise PipelineError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size >= 2")
    middle = [i for i in range(stages) if fixed.get(i) is None]
    left = num_layers - sum(n for n in fixed.values() if n is not None)
    if any(n is not None and n < 1 for n in fixed.values()) or left < len(middle) or (not middle and left):
        raise PipelineError(
            f"--decoder-first-pipeline-num-layers {first} / --decoder-last-pipeline-num-layers {last}: do not leave "
            f"at least one of the {num_layers} layers for each of the other {len(middle)} stages"
        )
    counts = [0] * stages
    for k, i in enumerate(middle):
        counts[i] = left // len(middle) + (k < left % len(middle))
    for i, n in fixed.items():
        if n is not None:
            counts[i] = n
    return counts


def stage_of(counts: Sequence[int], rank: int, layers: Sequence[int] | None = None, chunks: int = 1) -> PipelineStage:
    """Stage ``rank``'s layers: positions from ``counts`` (one per virtual stage when ``chunks`` > 1: rank ``r``
    holds virtual stages ``r, PP + r, ...``), named by ``layers`` (default ``0..n-1``)."""
    names = list(range(sum(counts))) if layers is None else list(layers)
    pp = len(counts) // chunks
    runs = []
    for virtual in range(rank, len(counts), pp):
        start = sum(counts[:virtual])
        runs.append(tuple(names[start : start + counts[virtual]]))
    held = tuple(i for run in runs for i in run)
    return PipelineStage(held, rank == 0, rank == pp - 1, tuple(runs) if chunks > 1 else ())


def current_stage(num_layers: int, split: Sequence[int] | None = None, first: int | None = None,
                  last: int | None = None, chunks: int = 1) -> PipelineStage:  # fmt: skip
    """This rank's stage (its ``chunks`` model chunks) of a model with ``num_layers`` layers."""
    pp = state.get_pipeline_model_parallel_world_size()
    counts = split_layers(num_layers, pp, split, first, last, chunks)
    return stage_of(counts, state.get_pipeline_model_parallel_rank(), chunks=chunks)


def sync_tied_embedding(model, gradients: bool = False) -> None:
    """Keep a ``GPTModel``'s tied embedding's two copies (first and last pipeline stage) equal: their gradients
    summed (``gradients``), or the first stage's weights copied to the last (at the start)."""
    group = state.get_embedding_group()
    if not model.config.tie_word_embeddings or state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not (model.stage.first or model.stage.last):
        return
    weight = model.embedding.weight
    if gradients:
        if weight.grad is not None:
            dist.all_reduce(weight.grad, group=group)
    else:
        with torch.no_grad():
            dist.broadcast(weight.data, state.get_pipeline_model_parallel_ranks()[0], group=group)
