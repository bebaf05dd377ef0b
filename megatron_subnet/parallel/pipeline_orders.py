"""Pipeline schedules as order lists, and the point-to-point plan that runs them: pure functions, no processes.

A schedule is, per pipeline rank, the order of its actions ``("F" or "B", model chunk, micro-batch)``; chunk
``c`` of rank ``r`` is virtual stage ``c * PP + r`` of ``chunks * PP`` (one chunk: the stage itself). The
four schedules of the trainer and the tools are four orders run by one executor (``pipeline_executor``)::

    no pipelining (PP=1)  F0 B0 F1 B1 F2 B2 F3 B3
    1F1B, PP=2, rank 0    F0 F1 B0 F2 B1 F3 B2 B3        (PP - rank - 1 warm-up forwards, then 1F1B)
          PP=2, rank 1    F0 B0 F1 B1 F2 B2 F3 B3
    interleaved, v=2      rank 0: F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 ...   (F<chunk>.<micro-batch>)
    forward only          every micro-batch forward, in groups of PP through chunk 0, then 1, ...

``p2p_plan`` turns every rank's order into rounds. In each round a rank runs at most one action, then posts
one batch of sends and receives: the message its action produced, and the messages its neighbours produced
in the same round. A message is sent and received in the same round, and a batch lists one neighbour's
messages in the same order on both sides, so sends and receives pair up by position alone, without tags:
how Megatron's interleaved schedule runs on NCCL, whose point-to-point operations match in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_subnet.parallel.pipeline import PipelineError

Action = tuple[str, int, int]  # ("F" | "B", model chunk, micro-batch)


def no_pipelining_order(num_microbatches: int) -> list[Action]:
    """One stage: each micro-batch's forward, then its backward (gradient accumulation)."""
    return [(kind, 0, i) for i in range(num_microbatches) for kind in "FB"]


def one_f_one_b_order(pp: int, rank: int, num_microbatches: int) -> list[Action]:
    """Megatron's non-interleaved 1F1B on ``rank``: ``PP - rank - 1`` warm-up forwards, one forward and one
    backward at a time, then the cool-down backwards; at most ``min(PP - rank, m)`` micro-batches in flight."""
    warmup = min(pp - rank - 1, num_microbatches)
    order: list[Action] = [("F", 0, i) for i in range(warmup)]
    for k in range(num_microbatches - warmup):
        order += [("F", 0, warmup + k), ("B", 0, k)]
    return order + [("B", 0, i) for i in range(num_microbatches - warmup, num_microbatches)]


def interleaved_order(pp: int, rank: int, chunks: int, num_microbatches: int) -> list[Action]:
    """Megatron's interleaved 1F1B order on pipeline ``rank`` over its ``chunks`` model chunks.

    Forwards go through the micro-batches in groups of ``pp``, each group through chunk 0, then 1, ...;
    backwards in the same groups, last chunk first. ``(pp - rank - 1) * 2 + (chunks - 1) * pp`` warm-up
    forwards (all of them when ``num_microbatches == pp``), then one forward and one backward, then the
    cool-down backwards. The bubble shrinks to (PP - 1) / (chunks * m + PP - 1)."""
    if chunks < 2 or pp < 2:
        raise PipelineError(f"interleaved pipeline: {chunks} model chunks on {pp} stages; it needs at least 2 of each")
    if num_microbatches % pp:
        raise PipelineError(
            f"interleaved pipeline: {num_microbatches} micro-batches is not a multiple of "
            f"--pipeline-model-parallel-size {pp}"
        )
    total = num_microbatches * chunks
    warmup = total if num_microbatches == pp else min((pp - rank - 1) * 2 + (chunks - 1) * pp, total)
    forwards = _grouped_forwards(pp, chunks, num_microbatches)
    backwards = [(chunks - 1 - chunk, i) for chunk, i in forwards]
    order: list[Action] = [("F", *forwards[k]) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", *forwards[warmup + k]), ("B", *backwards[k])]
    return order + [("B", *backwards[k]) for k in range(total - warmup, total)]


def forward_only_order(pp: int, chunks: int, num_microbatches: int) -> list[Action]:
    """Every micro-batch forward (evaluation, search fitness, importance), in groups of ``pp`` micro-batches
    through chunk 0, then 1, ... (the same on every rank), so the stages work on different micro-batches."""
    return [("F", chunk, i) for chunk, i in _grouped_forwards(pp, chunks, num_microbatches)]


def training_order(pp: int, rank: int, chunks: int, num_microbatches: int) -> list[Action]:
    """The training schedule of this layout: no pipelining, 1F1B, or interleaved 1F1B."""
    if pp == 1:
        return no_pipelining_order(num_microbatches)
    if chunks == 1:
        return one_f_one_b_order(pp, rank, num_microbatches)
    return interleaved_order(pp, rank, chunks, num_microbatches)


def _grouped_forwards(pp: int, chunks: int, num_microbatches: int) -> list[tuple[int, int]]:
    """(chunk, micro-batch) of every forward: groups of ``pp`` micro-batches (the last may be shorter), each
    group through chunk 0, then 1, ..."""
    order = []
    for start in range(0, num_microbatches, pp):
        group = range(start, min(start + pp, num_microbatches))
        order += [(chunk, i) for chunk in range(chunks) for i in group]
    return order


# ----------------------------------------------------------------------------- point-to-point plan


@dataclass(frozen=True)
class Transfer:
    """One message of a round, seen from one side: activations (``"F"``) for virtual stage ``virtual``'s
    forward of ``microbatch``, or the gradients (``"B"``) of its outputs, which that stage's backward needs;
    ``send``: this rank sends it to ``peer`` (pipeline rank), else receives it from ``peer``."""

    kind: str
    virtual: int
    microbatch: int
    peer: int
    send: bool


Round = tuple[Action | None, tuple[Transfer, ...]]  # the action run (or None), then one batch of messages


def p2p_plan(orders: list[list[Action]], chunks: int = 1) -> list[list[Round]]:
    """Every rank's rounds for running ``orders`` (one order per pipeline rank): a rank runs its next action
    in the first round after the message it needs arrived; the message an action produces is sent in the
    action's round and received in the same round by its neighbour. Rounds in which a rank neither acts nor
    communicates are left out of its list. Raises PipelineError if the orders wait on each other."""
    pp = len(orders)
    stages = pp * chunks
    position, arrived = [0] * pp, [set() for _ in range(pp)]
    rounds: list[list[Round]] = [[] for _ in range(pp)]
    while any(position[r] < len(orders[r]) for r in range(pp)):
        acted: list[Action | None] = [None] * pp
        batches: list[list[Transfer]] = [[] for _ in range(pp)]
        for r in range(pp):
            if position[r] == len(orders[r]):
                continue
            kind, chunk, i = action = orders[r][position[r]]
            virtual = chunk * pp + r
            needs = _message_into(kind, virtual, i, stages)
            if needs is not None and needs not in arrived[r]:
                continue
            acted[r], position[r] = action, position[r] + 1
            out = _message_out_of(kind, virtual, i, stages)
            if out is not None:
                peer = out[1] % pp
                batches[r].append(Transfer(*out, peer=peer, send=True))
                batches[peer].append(Transfer(*out, peer=r, send=False))
        if not any(acted):
            raise PipelineError(f"the pipeline orders wait on each other at positions {position}")
        for r in range(pp):
            arrived[r].update((t.kind, t.virtual, t.microbatch) for t in batches[r] if not t.send)
            if acted[r] or batches[r]:
                rounds[r].append((acted[r], tuple(sorted(batches[r], key=_canonical))))
    return rounds


def _message_into(kind: str, virtual: int, i: int, stages: int) -> tuple[str, int, int] | None:
    """The message an action waits for: a forward the previous virtual stage's activations, a backward the
    next one's gradients; None at the ends."""
    if kind == "F":
        return None if virtual == 0 else ("F", virtual, i)
    return None if virtual == stages - 1 else ("B", virtual, i)


def _message_out_of(kind: str, virtual: int, i: int, stages: int) -> tuple[str, int, int] | None:
    """The message an action produces, named by the action it feeds (on virtual stage ``virtual +- 1``)."""
    if kind == "F":
        return None if virtual == stages - 1 else ("F", virtual + 1, i)
    return None if virtual == 0 else ("B", virtual - 1, i)


def _canonical(t: Transfer) -> tuple:
    """The order of a batch's messages, the same on both sides of each one: by message, then direction."""
    return (t.kind, t.virtual, t.microbatch)
