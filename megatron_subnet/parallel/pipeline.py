"""Pipeline parallelism: which layers a stage holds, point-to-point messages between neighbouring stages, and
the schedules (1F1B for training, interleaved 1F1B over virtual stages, forward-only for evaluation).

A message between stages is a list of tensors whose shapes both sides know in advance: the student's hidden
states and, when distilling, the teacher's, in the same message, so the last stage holds both models'
outputs for the KD loss without an extra round trip. Tensor-parallel rank ``t`` of one stage talks to
tensor-parallel rank ``t`` of the next. Sends and receives of one step are posted together
(``batch_isend_irecv``), which never deadlocks on neighbours that send to each other at once. The
interleaved schedule keeps receives posted ahead instead, on gloo.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
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


def stage_of(
    counts: Sequence[int], rank: int, layers: Sequence[int] | None = None, chunks: int = 1
) -> PipelineStage:
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


# ----------------------------------------------------------------------------- point to point


def _neighbour(offset: int) -> int:
    ranks = state.get_pipeline_model_parallel_ranks()
    return ranks[state.get_pipeline_model_parallel_rank() + offset]


def communicate(
    send_next: list[torch.Tensor] | None = None,
    send_prev: list[torch.Tensor] | None = None,
    recv_prev: list[tuple[tuple[int, ...], torch.dtype]] | None = None,
    recv_next: list[tuple[tuple[int, ...], torch.dtype]] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Post every send and receive of one step at once; returns (received from prev, received from next)."""
    ops, from_prev, from_next = [], None, None
    if recv_prev is not None:
        from_prev = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in recv_prev]
        ops += [dist.P2POp(dist.irecv, t, _neighbour(-1)) for t in from_prev]
    if send_next is not None:
        ops += [dist.P2POp(dist.isend, t.contiguous(), _neighbour(1)) for t in send_next]
    if send_prev is not None:
        ops += [dist.P2POp(dist.isend, t.contiguous(), _neighbour(-1)) for t in send_prev]
    if recv_next is not None:
        from_next = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in recv_next]
        ops += [dist.P2POp(dist.irecv, t, _neighbour(1)) for t in from_next]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return from_prev, from_next


def _ring_neighbours() -> tuple[int, int]:
    """(previous, next) global ranks of this stage on the ring of virtual stages (the last wraps to the first)."""
    ranks = state.get_pipeline_model_parallel_ranks()
    rank = state.get_pipeline_model_parallel_rank()
    return ranks[(rank - 1) % len(ranks)], ranks[(rank + 1) % len(ranks)]


# ----------------------------------------------------------------------------- schedules

# forward(micro-batch index, received tensors or None) -> (tensors to send on, or the loss on the last stage)
ForwardFn = Callable[[int, list[torch.Tensor] | None], list[torch.Tensor] | torch.Tensor]
# backward(micro-batch index, outputs, their gradients from the next stage, or None on the last stage) -> None;
# the received inputs' .grad is then sent back
BackwardFn = Callable[[int, list[torch.Tensor] | torch.Tensor, list[torch.Tensor] | None], None]


@dataclass
class Messages:
    """Shapes and dtypes of what travels between stages: forward tensors, and which of them have a gradient
    travelling back (the student's hidden states; not the teacher's)."""

    forward: list[tuple[tuple[int, ...], torch.dtype]]
    with_grad: int = 1  # the first ``with_grad`` forward tensors carry gradients back

    @property
    def backward(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return self.forward[: self.with_grad]


def forward_backward_1f1b(
    num_microbatches: int, forward: ForwardFn, backward: BackwardFn, messages: Messages,
    device: torch.device | str = "cpu",
) -> int:  # fmt: skip
    """One forward and one backward at a time after ``PP - stage - 1`` warm-up forwards, then the cool-down
    backwards (Megatron's non-interleaved schedule). At most ``PP`` micro-batches are in flight on a stage;
    a micro-batch's activations are dropped as soon as its backward ran. Returns the peak in flight."""
    pp, rank = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
    first, last = rank == 0, rank == pp - 1
    warmup = min(pp - rank - 1, num_microbatches)
    in_flight: deque = deque()
    peak = 0

    def recv_forward() -> list[torch.Tensor] | None:
        if first:
            return None
        received, _ = communicate(recv_prev=messages.forward, device=device)
        for t in received[: messages.with_grad]:
            t.requires_grad_()
        return received

    def run_forward(i: int, inputs):
        nonlocal peak
        outputs = forward(i, inputs)
        in_flight.append((i, inputs, outputs))
        peak = max(peak, len(in_flight))
        return outputs

    def run_backward(grads):
        i, inputs, outputs = in_flight.popleft()
        backward(i, outputs, None if last else grads)
        if first:
            return None
        return [t.grad for t in inputs[: messages.with_grad]]

    for i in range(warmup):
        outputs = run_forward(i, recv_forward())
        communicate(send_next=[t.detach() for t in outputs], device=device)
    remaining = num_microbatches - warmup
    inputs = recv_forward() if remaining else None
    for k in range(remaining):
        outputs = run_forward(warmup + k, inputs)
        grads = None
        if not last:  # send this forward's output, receive the gradient of the oldest one in flight
            _, received = communicate(send_next=[t.detach() for t in outputs], recv_next=messages.backward,
                                      device=device)  # fmt: skip
            grads = received
        input_grads = run_backward(grads)
        if k == remaining - 1:
            inputs = None
            if not first:
                communicate(send_prev=input_grads, device=device)
        else:
            if first:
                inputs = None
            else:
                received, _ = communicate(send_prev=input_grads, recv_prev=messages.forward, device=device)
                for t in received[: messages.with_grad]:
                    t.requires_grad_()
                inputs = received
    for _ in range(warmup):
        _, grads = communicate(recv_next=messages.backward, device=device)
        input_grads = run_backward(grads)
        if not first:
            communicate(send_prev=input_grads, device=device)
    return peak


# forward(model chunk, micro-batch index, received tensors or None), backward(model chunk, micro-batch index,
# outputs, gradients or None): as ForwardFn / BackwardFn, for the chunk's virtual stage
ChunkForwardFn = Callable[[int, int, list[torch.Tensor] | None], list[torch.Tensor] | torch.Tensor]
ChunkBackwardFn = Callable[[int, int, list[torch.Tensor] | torch.Tensor, list[torch.Tensor] | None], None]

_ACTIVATIONS, _GRADIENTS = 0, 1  # message tags: the two streams that share a pair of ranks at PP=2


def interleaved_order(pp: int, rank: int, chunks: int, num_microbatches: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved 1F1B order on pipeline ``rank``: ``("F" or "B", model chunk, micro-batch)``.

    Rank ``r`` holds ``chunks`` model chunks; chunk ``c`` is virtual stage ``c * pp + r`` of ``chunks * pp``.
    Forwards go through the micro-batches in groups of ``pp``, each group through chunk 0, then 1, ...;
    backwards in the same groups, last chunk first. ``(pp - rank - 1) * 2 + (chunks - 1) * pp`` warm-up
    forwards (all of them when ``num_microbatches == pp``), then one forward and one backward, then the
    cool-down backwards."""
    if chunks < 2 or pp < 2:
        raise PipelineError(
            f"interleaved pipeline: {chunks} model chunks on {pp} stages; it needs at least 2 of each"
        )
    if num_microbatches % pp:
        raise PipelineError(
            f"interleaved pipeline: {num_microbatches} micro-batches is not a multiple of "
            f"--pipeline-model-parallel-size {pp}"
        )
    total = num_microbatches * chunks
    warmup = total if num_microbatches == pp else min((pp - rank - 1) * 2 + (chunks - 1) * pp, total)

    def forward_of(k: int) -> tuple[int, int]:
        group, j = divmod(k, pp * chunks)
        return j // pp, group * pp + j % pp

    def backward_of(k: int) -> tuple[int, int]:
        chunk, i = forward_of(k)
        return chunks - 1 - chunk, i

    order = [("F", *forward_of(k)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", *forward_of(warmup + k)), ("B", *backward_of(k))]
    return order + [("B", *backward_of(k)) for k in range(total - warmup, total)]


def forward_backward_interleaved(
    num_microbatches: int, chunks: int, forward: ChunkForwardFn, backward: ChunkBackwardFn, messages: Messages,
    device: torch.device | str = "cpu",
) -> int:  # fmt: skip
    """Interleaved 1F1B (``interleaved_order``) over this rank's ``chunks`` model chunks: the bubble shrinks to
    (PP - 1) / (chunks * m + PP - 1), for ``chunks`` times the messages and more micro-batches in flight on the
    early stages. Virtual stage ``s`` receives from ``s - 1`` (the last rank's chunk ``c`` feeds the first
    rank's chunk ``c + 1``, a ring). Activations and gradients are two tagged streams (at PP=2 both neighbours
    are the same rank); each keeps the receive of its next message posted, and sends are not waited for until
    the step's end, so a stage waits only for data the schedule has not produced yet. Returns the peak number
    of (chunk, micro-batch) forwards in flight."""
    pp, rank = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
    order = interleaved_order(pp, rank, chunks, num_microbatches)
    backend = dist.get_backend(state.get_pipeline_model_parallel_group())
    if backend != "gloo":  # NCCL ignores tags and serialises one pair's sends and receives on one stream
        raise PipelineError(f"interleaved pipeline: runs on gloo only for now, not {backend}")
    prev, next_ = _ring_neighbours()

    def is_first(chunk: int) -> bool:  # virtual stage 0: the micro-batch starts here
        return rank == 0 and chunk == 0

    def is_last(chunk: int) -> bool:  # the last virtual stage: the loss
        return rank == pp - 1 and chunk == chunks - 1

    # what arrives, in order: activations from the previous virtual stage, gradients from the next
    activations = _Incoming(messages.forward, prev, _ACTIVATIONS, device,
                            sum(k == "F" and not is_first(c) for k, c, _ in order))
    gradients = _Incoming(messages.backward, next_, _GRADIENTS, device,
                          sum(k == "B" and not is_last(c) for k, c, _ in order))  # fmt: skip
    in_flight: dict[tuple[int, int], tuple] = {}
    sends: list[tuple[dist.Work, torch.Tensor]] = []  # a send's tensor lives until the send completed
    peak = 0

    def send(tensors: list[torch.Tensor], target: int, tag: int) -> None:
        sends[:] = [(work, t) for work, t in sends if not work.is_completed()]
        for t in tensors:
            t = t.detach().contiguous()
            sends.append((dist.isend(t, target, tag=tag), t))

    for kind, chunk, i in order:
        if kind == "F":
            inputs = None
            if not is_first(chunk):
                inputs = activations.take()
                for t in inputs[: messages.with_grad]:
                    t.requires_grad_()
            outputs = forward(chunk, i, inputs)
            in_flight[chunk, i] = (inputs, outputs)
            peak = max(peak, len(in_flight))
            if not is_last(chunk):
                send(outputs, next_, _ACTIVATIONS)
        else:
            inputs, outputs = in_flight.pop((chunk, i))
            grads = None if is_last(chunk) else gradients.take()
            backward(chunk, i, outputs, grads)
            if not is_first(chunk):
                send([t.grad for t in inputs[: messages.with_grad]], prev, _GRADIENTS)
            del inputs, outputs
    for work, _ in sends:
        work.wait()
    return peak


class _Incoming:
    """One stream of messages from one neighbour (one tag), ``count`` of them: the receive of the next one is
    always posted ahead, so a neighbour's send completes as soon as it is made (gloo holds a send until its
    receive is posted: measured) and its transfer overlaps this stage's compute."""

    def __init__(self, specs, source: int, tag: int, device, count: int):
        self.specs, self.source, self.tag, self.device, self.left = specs, source, tag, device, count
        self.posted = self._post() if count else None

    def _post(self):
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.specs]
        return tensors, [dist.irecv(t, self.source, tag=self.tag) for t in tensors]

    def take(self) -> list[torch.Tensor]:
        tensors, works = self.posted
        for work in works:
            work.wait()
        self.left -= 1
        self.posted = self._post() if self.left else None
        return tensors


def forward_only(
    num_microbatches: int, forward: ForwardFn, messages: Messages, device: torch.device | str = "cpu"
) -> None:
    """Every micro-batch through every stage, no backward (evaluation, search fitness, importance)."""
    pp, rank = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
    for i in range(num_microbatches):
        inputs = None if rank == 0 else communicate(recv_prev=messages.forward, device=device)[0]
        outputs = forward(i, inputs)
        if rank < pp - 1:
            communicate(send_next=[t.detach() for t in outputs], device=device)


def forward_only_interleaved(
    num_microbatches: int, chunks: int, forward: ChunkForwardFn, messages: Messages,
    device: torch.device | str = "cpu",
) -> None:  # fmt: skip
    """Every micro-batch through every virtual stage in turn, no backward (evaluation of a model held as
    ``chunks`` model chunks per stage): one chain of blocking hand-offs round the ring of stages."""
    pp, rank = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
    prev, next_ = _ring_neighbours()
    for i in range(num_microbatches):
        for chunk in range(chunks):
            inputs = None
            if not (rank == 0 and chunk == 0):
                inputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in messages.forward]
                for t in inputs:
                    dist.recv(t, prev, tag=_ACTIVATIONS)
            outputs = forward(chunk, i, inputs)
            if not (rank == pp - 1 and chunk == chunks - 1):
                for t in outputs:
                    dist.send(t.detach().contiguous(), next_, tag=_ACTIVATIONS)


def broadcast_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """``values`` of the last stage on every stage of this pipeline (in place; a CPU tensor travels through
    the accelerator when the group is NCCL's)."""
    if state.get_pipeline_model_parallel_world_size() == 1:
        return values
    group = state.get_pipeline_model_parallel_group()
    device_copy = values.cuda() if dist.get_backend(group) == "nccl" and not values.is_cuda else values
    dist.broadcast(device_copy, state.get_pipeline_model_parallel_ranks()[-1], group=group)
    if device_copy is not values:
        values.copy_(device_copy.cpu())
    return values
