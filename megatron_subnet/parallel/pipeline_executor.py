"""The one pipeline executor: runs any schedule's order (``pipeline_orders``) over one point-to-point mechanism.

A message between stages is a list of tensors whose shapes both sides know in advance (``Messages``): the
student's hidden states and, when distilling, the teacher's, in one message, so the last stage holds both
models' outputs for the KD loss without an extra round trip. Tensor-parallel rank ``t`` of one stage talks
to tensor-parallel rank ``t`` of the next. Each round of ``p2p_plan`` posts its sends and receives as one
batch (``batch_isend_irecv``), in the order both neighbours computed, without tags: gloo and NCCL both
accept it. Nothing waits on a receive before the action that needs it, and on a send only when more than PP
messages are in flight (or at the end), so a stage waits only for data the schedule has not produced yet.

Callbacks: ``forward(chunk, micro-batch, received tensors or None)`` returns the tensors to send on, or the
loss on the last virtual stage; ``backward(chunk, micro-batch, scalar)`` backpropagates ``scalar``: the loss
on the last virtual stage, elsewhere a stand-in whose gradient is the one the next stage sent back (the
received inputs' gradients then travel back). A sent output's storage is freed once its send is posted
(Megatron's ``deallocate_output_tensor``): its backward goes through the stand-in, built before the free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from megatron_subnet.parallel import state
from megatron_subnet.parallel.pipeline_orders import (
    Action,
    Round,
    Transfer,
    forward_only_order,
    p2p_plan,
    training_order,
)

ForwardFn = Callable[[int, int, list[torch.Tensor] | None], list[torch.Tensor] | torch.Tensor]
BackwardFn = Callable[[int, int, torch.Tensor], None]
Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass
class Messages:
    """Shapes and dtypes of what travels between stages: forward tensors, and which of them have a gradient
    travelling back (the student's hidden states; not the teacher's)."""

    forward: list[Spec]
    with_grad: int = 1  # the first ``with_grad`` forward tensors carry gradients back

    @property
    def backward(self) -> list[Spec]:
        return self.forward[: self.with_grad]


@lru_cache(maxsize=64)
def _rounds(kind: str, pp: int, rank: int, chunks: int, num_microbatches: int) -> tuple[Round, ...]:
    if kind == "train":
        orders = [training_order(pp, r, chunks, num_microbatches) for r in range(pp)]
    else:
        orders = [forward_only_order(pp, chunks, num_microbatches) for _ in range(pp)]
    return tuple(p2p_plan(orders, chunks)[rank])


def forward_backward(
    num_microbatches: int, chunks: int, forward: ForwardFn, backward: BackwardFn, messages: Messages,
    device: torch.device | str = "cpu", trace: list | None = None,
) -> int:  # fmt: skip
    """This rank's share of a training step's schedule (``training_order``: no pipelining, 1F1B, or interleaved
    over ``chunks`` model chunks); returns the peak number of (chunk, micro-batch) forwards in flight.
    ``trace``: appends every posted send and receive (``Transfer``, shapes), for tests."""
    pp, rank = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
    rounds = _rounds("train", pp, rank, chunks, num_microbatches)
    return _Executor(pp, rank, chunks, messages, device, trace).run(rounds, forward, backward)


def forward_only(
    num_microbatches: int, chunks: int, forward: ForwardFn, messages: Messages,
    device: torch.device | str = "cpu", trace: list | None = None,
) -> None:  # fmt: skip
    """Every micro-batch through every (virtual) stage, no backward (evaluation, search fitness, importance)."""
    pp, rank = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
    rounds = _rounds("forward", pp, rank, chunks, num_microbatches)
    with torch.no_grad():
        _Executor(pp, rank, chunks, messages, device, trace).run(rounds, forward, None)


class _GradientInlet(torch.autograd.Function):
    """A zero scalar standing for a stage's outputs: its backward hands each output the gradient stored in
    ``slot`` (the next stage's, received later), so the outputs' storage can be freed once they are sent."""

    @staticmethod
    def forward(ctx, slot: list, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.slot = slot
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *(g * grad for g in ctx.slot))


class _Executor:
    """One run of one rank's rounds: what arrived, what is in flight, the sends not yet known complete."""

    def __init__(self, pp: int, rank: int, chunks: int, messages: Messages, device, trace: list | None):
        self.pp, self.rank, self.stages, self.messages, self.device = pp, rank, pp * chunks, messages, device
        self.ranks = state.get_pipeline_model_parallel_ranks()
        self.trace = trace
        self.arrived: dict[tuple[str, int, int], tuple[list[torch.Tensor], list]] = {}
        self.in_flight: dict[tuple[int, int], tuple] = {}  # (chunk, micro-batch) -> inputs, outputs, scalar
        # each posted send's works and tensors, oldest first: a sent tensor lives until its send completed
        self.sending: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
        self.peak = 0

    def run(self, rounds, forward: ForwardFn, backward: BackwardFn | None) -> int:
        for action, transfers in rounds:
            produced = None
            if action is not None and action[0] == "F":
                produced = self._forward(action, forward, training=backward is not None)
            elif action is not None:
                produced = self._backward(action, backward)
            self._post(transfers, produced)
        self._wait_sends(0)
        return self.peak

    def _virtual(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def _forward(self, action: Action, forward: ForwardFn, training: bool) -> list[torch.Tensor] | None:
        _, chunk, i = action
        virtual = self._virtual(chunk)
        inputs = None if virtual == 0 else self._take(("F", virtual, i))
        if inputs is not None and training:
            for t in inputs[: self.messages.with_grad]:
                t.requires_grad_()
        result = forward(chunk, i, inputs)
        last = virtual == self.stages - 1
        if training:
            slot: list[torch.Tensor] = []
            scalar = result if last else _GradientInlet.apply(slot, *result[: self.messages.with_grad])
            self.in_flight[chunk, i] = (inputs, result if not last else None, scalar, slot)
            self.peak = max(self.peak, len(self.in_flight))
        return None if last else result

    def _backward(self, action: Action, backward: BackwardFn) -> list[torch.Tensor] | None:
        _, chunk, i = action
        virtual = self._virtual(chunk)
        inputs, outputs, scalar, slot = self.in_flight.pop((chunk, i))
        if virtual < self.stages - 1:
            slot.extend(self._take(("B", virtual, i)))
        backward(chunk, i, scalar)
        if virtual == 0:
            return None
        return [t.grad for t in inputs[: self.messages.with_grad]]

    def _take(self, key: tuple[str, int, int]) -> list[torch.Tensor]:
        tensors, works = self.arrived.pop(key)
        for work in works:
            work.wait()
        return tensors

    def _post(self, transfers: tuple[Transfer, ...], produced: list[torch.Tensor] | None) -> None:
        """One round's batch: the produced message's sends and the neighbours' messages' receives, in the
        plan's order; then the sent outputs' storage is freed (the send holds its own reference)."""
        ops, sent, received = [], [], {}
        for t in transfers:
            peer = self.ranks[t.peer]
            if t.send:
                tensors = [x.detach().contiguous() for x in produced]
                ops += [dist.P2POp(dist.isend, x, peer) for x in tensors]
                sent += [len(ops) - 1 - k for k in range(len(tensors))]
            else:
                specs = self.messages.forward if t.kind == "F" else self.messages.backward
                tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
                received[t.kind, t.virtual, t.microbatch] = (tensors, range(len(ops), len(ops) + len(tensors)))
                ops += [dist.P2POp(dist.irecv, x, peer) for x in tensors]
            if self.trace is not None:
                self.trace.append((t, tuple(tuple(x.shape) for x in tensors)))
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        # gloo: one work per operation; NCCL: one for the whole (coalesced) batch
        of = (lambda j: [works[j]]) if len(works) == len(ops) else (lambda j: works)
        if sent:
            self.sending.append(([w for j in sent for w in of(j)], [ops[j].tensor for j in sent]))
        self._wait_sends(self.pp)
        for key, (tensors, positions) in received.items():
            self.arrived[key] = (tensors, [w for j in positions for w in of(j)])
        if sent:
            _free(produced)

    def _wait_sends(self, keep: int) -> None:
        """Drop the sends that completed (waited on, so a failed one raises), then wait on the oldest until at
        most ``keep`` messages are in flight: a stage that only sends (forward only) holds at most ``keep``
        outputs. Waiting on a send of an earlier round cannot deadlock: its receiver posts that round's batch
        after waiting only on rounds before it."""
        pending = []
        for works, tensors in self.sending:
            if all(w.is_completed() for w in works):
                for w in works:
                    w.wait()
            else:
                pending.append((works, tensors))
        while len(pending) > keep:
            for w in pending.pop(0)[0]:
                w.wait()
        self.sending = pending


def _free(outputs: list[torch.Tensor]) -> None:
    """Release sent outputs' storage, keeping the tensors (and their autograd graph) for the backward."""
    for t in outputs:
        if t._base is None:
            t.data = torch.empty((1,), dtype=t.dtype, device=t.device)


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
