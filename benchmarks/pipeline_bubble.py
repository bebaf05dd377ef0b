"""Pipeline bubble of the 1F1B schedule, measured per stage against the analytical (p - 1) / (m + p - 1), and
of the interleaved schedule against its (p - 1) / (v m + p - 1); peak activation memory per stage against
PP x one micro-batch's activations.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_bubble.py [--pp 2 4] [--microbatches 4 8] \\
        [--virtual-stages 1 2] [--layers 8 --hidden-size 384 --heads 6 --query-groups 2 \\
        --ffn-hidden-size 1024 --vocab-size 256 --micro-batch-size 2 --seq-length 256] [--steps 6] \\
        [--output results.json]

**What runs.** For each PP, PP gloo processes (one thread each, ``OMP_NUM_THREADS=1``) each build their stage
of a random-weight llama-like ``GPTModel`` (``split_layers`` / ``stage_of``: 8 layers are 4 + 4 at PP=2 and
2 + 2 + 2 + 2 at PP=4; embedding on the first stage, final norm and untied output layer on the last) and run
the real schedule, ``parallel.pipeline_executor.forward_backward`` (1F1B), with plain autograd (no DeepSpeed, no
optimizer step). With ``--virtual-stages v`` > 1 each process holds v model chunks instead (the layers split
over v x PP virtual stages; chunk c of stage r is virtual stage c x PP + r: 8 layers at PP=2, v=2 put layers
0, 1, 4, 5 on the first process), as the trainer builds them for ``--virtual-pipeline-model-parallel-size v``
(one ``GPTModel`` over ``stage_of(..., chunks=v)``, run as ``model(x, chunk=c)``), and runs
the same executor's interleaved order (Megatron's interleaved 1F1B) for the m that are multiples of PP. In both,
the last stage's loss is ``parallel.losses.cross_entropy`` and earlier stages backward their output with the
gradient the schedule received. The vocabulary is small by default so that the last stage's output layer
does not unbalance the stages (the analytical bubble assumes equal stages).

**Idle fraction.** The forward and backward callbacks are timed (``time.perf_counter``, CLOCK_MONOTONIC, the
same clock in every process); the time a stage spends posting or waiting for messages is not inside them.
After a barrier, one step's wall time is from the first stage's start to the last stage's return (``max(end) -
min(start)`` over the ranks), and a stage's idle fraction is ``1 - busy / wall``, summed over ``--steps``
timed steps that follow one untimed warm-up step ("best step": the same for the timed step of least wall time
alone). The analytical 1F1B bubble for p equal stages and m micro-batches is (p - 1) / (m + p - 1) of every
stage's time; the table gives measured / analytical per stage (target <= 1.1x). The "replay" column is the
idle the same steps would have had if messages cost nothing: every stage's events in the order and with the
durations measured, a forward waiting only for the previous stage's forward of its micro-batch and a backward
for the next stage's backward. The "mean-duration replay" replays the same order with every event at its
stage's mean F or B duration: the bubble the stages' average costs imply, without the jitter of single events
(on a shared CPU one stage's forward of the same micro-batch shape ranges over 1.7x within a step, and every
hand-off waits for the slower of two). The "equal-stage replay" gives every stage's forward (backward) the
mean over all stages: the equal stages the analytical bubble assumes, so it checks the schedule's order alone
(1.00x when the order is 1F1B's). The four columns split the measured ratio: equal-stage replay (the
schedule), mean replay (+ the stages' unequal average costs: the last one holds the output layer and the
loss), replay (+ the jitter of single events, whose size the "duration CV" column gives: standard deviation /
mean of one stage's forward or backward durations), and measured (+ the messages: gloo over loopback TCP, and
the wake-up of a process that waited). "CPU replay" replays the same way with each event's CPU time
(``time.thread_time``: one thread does the forward, the backward and every op, ``OMP_NUM_THREADS=1``) instead
of its wall time: what the schedule and the stages' imbalance alone imply, without the time a stage waited for
a core (other jobs, or PP > cores). Both replays are models built from measurements; the measured idle is the
column the target is about.

**CPU contention.** This machine has 2 cores (shared with other jobs). PP=2 runs one process per core and is
the meaningful arm. PP=4 runs 4 processes on 2 cores: a stage's compute then also waits for a core, so its
busy time stretches and its measured idle includes CPU contention (the OS, not the schedule, decides who
runs); its ratios are reported but say little about the schedule.

**Activation memory.** During the warm-up step ``torch.autograd.graph.saved_tensors_hooks`` wraps every
tensor autograd saves for backward; the live total counts each storage once (``untyped_storage().nbytes()``)
while any saved reference to it lives, excludes the parameters, and drops a tensor as soon as autograd
releases it (after its node's backward). The peak over the schedule is compared with PP x the peak of one
micro-batch through the same stage's layers measured the same way in one process (no pipeline): target
<= 1.0x. Megatron's 1F1B holds at most min(PP - stage, m) micro-batches on a stage, so the expected ratio is
min(PP - stage, m) / PP (1.0 on the first stage, 1 / PP on the last); the last column is peak / that.
The interleaved schedule holds up to 2 (PP - stage - 1) + (v - 1) PP + 1 (chunk, micro-batch) forwards, each
1 / v of the stage's layers, so its first stage exceeds PP micro-batches (1.25x at PP=2, v=2): the price of
the smaller bubble; the last column is then peak / (that count / v x one micro-batch).
The stage's messages (received inputs, its outputs kept for the backward) are not saved tensors and are not
counted there. The outputs are measured apart ("outputs held": the storage of every output still referenced,
sampled at each forward and backward): the executor frees a sent output's storage as soon as its send is
posted (Megatron's ``deallocate_output_tensor``), where it used to hold one [b, s, h] tensor per
micro-batch in flight until the backward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megatron_subnet.model.config import ModelConfig  # noqa: E402
from megatron_subnet.model.gpt import GPTModel  # noqa: E402
from megatron_subnet.outputs import write_text_atomically  # noqa: E402
from megatron_subnet.parallel import state  # noqa: E402
from megatron_subnet.parallel.losses import cross_entropy  # noqa: E402
from megatron_subnet.parallel.pipeline import split_layers, stage_of  # noqa: E402
from megatron_subnet.parallel.pipeline_executor import Messages, forward_backward  # noqa: E402

# ----------------------------------------------------------------------------- saved activations


class SavedActivations:
    """While entered, counts the bytes of tensors autograd saves for backward that are alive: each storage
    once, parameters excluded; ``live`` now and ``peak`` since the last ``reset``."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [saved references alive, bytes]
        self.live = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset(self) -> None:
        self.peak = self.live

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.params or storage.nbytes() == 0:
            return t
        with self._lock:
            entry = self.refs.setdefault(key, [0, storage.nbytes()])
            entry[0] += 1
            if entry[0] == 1:
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def release(self, key: int) -> None:
        with self._lock:
            entry = self.refs[key]
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[key]

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    """A saved tensor; autograd dropping it (after its node's backward) takes it off the live total."""

    __slots__ = ("tensor", "owner", "key")

    def __init__(self, tensor: torch.Tensor, owner: SavedActivations, key: int):
        self.tensor, self.owner, self.key = tensor, owner, key

    def __del__(self):
        self.owner.release(self.key)


class OutputsHeld:
    """The stage's outputs kept for their backward (the schedule holds them until then): the bytes of their
    storage now, sampled at every forward and backward, and the ``peak`` since ``reset``. The executor frees
    a sent output's storage (Megatron's ``deallocate_output_tensor``), so this measures that it did."""

    def __init__(self):
        self.refs: list[weakref.ref] = []
        self.peak = 0

    def reset(self) -> None:
        self.refs, self.peak = [], 0

    def add(self, output: torch.Tensor) -> None:
        self.refs.append(weakref.ref(output))

    def sample(self) -> None:
        alive = [t for t in (r() for r in self.refs) if t is not None]
        self.refs = [weakref.ref(t) for t in alive]
        self.peak = max(self.peak, sum(t.untyped_storage().nbytes() for t in alive))


# ----------------------------------------------------------------------------- one stage


def llama_config(args) -> dict:
    return dict(
        arch="llama", vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
        num_attention_heads=args.heads, num_query_groups=args.query_groups, head_dim=args.hidden_size // args.heads,
        ffn_hidden_size=args.ffn_hidden_size, tie_word_embeddings=False, rope_theta=100000.0,
        max_position_embeddings=max(2048, args.seq_length),
    )  # fmt: skip


def run_stage(rank: int, spec: dict) -> dict:
    """This rank's measurements for every number of virtual stages in ``spec["virtual"]``: see ``measure``."""
    return {v: measure(rank, v, spec) for v in spec["virtual"]}


def measure(rank: int, chunks: int, spec: dict) -> dict:
    """This rank's stage of ``chunks`` model chunks (the trainer's ``GPTModel(x, chunk=c)``): one micro-batch's
    saved activations alone, then per m a warm-up step (memory) and ``steps`` timed steps of the 1F1B schedule
    (interleaved when chunks > 1: chunk c is virtual stage ``c * PP + rank`` of ``chunks * PP``)."""
    pp = state.get_pipeline_model_parallel_world_size()
    config = ModelConfig(**spec["config"])
    counts = split_layers(config.num_layers, pp * chunks)
    stage = stage_of(counts, rank, chunks=chunks)
    torch.manual_seed(spec["seed"] + rank)
    model = GPTModel(config, stage=stage).train()
    b, s, h = spec["batch"], spec["seq"], config.hidden_size
    g = torch.Generator().manual_seed(spec["seed"])
    batches = torch.randint(config.vocab_size, (max(spec["microbatches"]), b, s + 1), generator=g)
    hidden = torch.randn(b, s, h, generator=g)
    messages = Messages([((b, s, h), torch.float32)], with_grad=1)
    tracker = SavedActivations(list(model.parameters()))

    def chunk_forward(c: int, i: int, x: torch.Tensor):
        out = model(x, chunk=c)
        return cross_entropy(out, batches[i][:, 1:]) if stage.holds_last(c) else out

    # one micro-batch through this rank's layers (its chunks one after the other), no pipeline
    for _ in range(2):
        x = batches[0][:, :-1] if stage.first else hidden.clone().requires_grad_()
        with tracker:
            tracker.reset()
            for c in range(chunks):
                x = chunk_forward(c, 0, x)
            x.backward() if stage.last else x.backward(torch.ones_like(x))
    one = tracker.peak
    assert tracker.live == 0, tracker.refs

    # (F or B, (chunk, micro-batch), start, end, CPU seconds of this thread) of the current step
    spans: list[tuple[str, tuple[int, int], float, float, float]] = []
    outputs = OutputsHeld()

    def forward(c, i, received):
        outputs.sample()
        t0, c0 = time.perf_counter(), time.thread_time()
        result = chunk_forward(c, i, batches[i][:, :-1] if stage.holds_first(c) else received[0])
        spans.append(("F", (c, i), t0, time.perf_counter(), time.thread_time() - c0))
        if stage.holds_last(c):
            return result
        outputs.add(result)
        return [result]

    def backward(c, i, scalar):
        outputs.sample()
        t0, c0 = time.perf_counter(), time.thread_time()
        scalar.backward()
        spans.append(("B", (c, i), t0, time.perf_counter(), time.thread_time() - c0))

    def schedule(m: int) -> int:
        return forward_backward(m, chunks, forward, backward, messages)

    results = {"layers": list(stage.layers), "one_microbatch_bytes": one, "runs": {}}
    for m in spec["microbatches"]:
        if chunks > 1 and m % pp:
            continue
        steps = []
        for step in range(1 + spec["steps"]):
            model.zero_grad(set_to_none=True)
            spans.clear()
            dist.barrier()
            with tracker if step == 0 else contextlib.nullcontext():
                tracker.reset()
                outputs.reset()
                start = time.perf_counter()
                in_flight = schedule(m)
                end = time.perf_counter()
            if step == 0:
                assert tracker.live == 0, f"saved activations still alive after the schedule: {tracker.live} bytes"
                peak, output_peak = tracker.peak, outputs.peak
            else:
                steps.append({"start": start, "end": end, "spans": list(spans)})
        results["runs"][m] = {"peak_bytes": peak, "peak_output_bytes": output_peak, "peak_in_flight": in_flight,
                              "steps": steps}  # fmt: skip
    return results


# ----------------------------------------------------------------------------- processes (as tests/distributed.py)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, spec: dict, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        state.initialize_model_parallel(1, world)
        results.put((rank, True, pickle.dumps(run_stage(rank, spec))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_pipeline(pp: int, spec: dict, timeout: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, pp, port, spec, results)) for r in range(pp)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    try:
        for _ in range(pp):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                sys.exit(f"error: PP={pp} rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    except queue.Empty:
        sys.exit(f"error: PP={pp} timed out after {timeout:.0f} s; ranks done: {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(pp)]


# ----------------------------------------------------------------------------- summary


def analytical_bubble(pp: int, m: int, chunks: int = 1) -> float:
    """Idle fraction of every stage of equal stages: 1F1B's (p - 1) / (m + p - 1), interleaved over ``chunks``
    model chunks (p - 1) / (chunks * m + p - 1)."""
    return (pp - 1) / (chunks * m + pp - 1)


def replay(stage_spans: list[list[tuple]], cpu: bool = False) -> float:
    """The step's wall time had every message cost nothing: each stage runs its events in the order it ran
    them, with the durations it measured, a forward waiting only for the previous virtual stage's forward of
    the same micro-batch, a backward for the next one's backward (event ``(kind, (chunk, micro-batch), ...)``
    of stage ``r`` is virtual stage ``chunk * PP + r``)."""
    pp = len(stage_spans)
    last = pp * (1 + max(c for spans in stage_spans for _, (c, _), *_ in spans)) - 1
    end: dict[tuple[int, str, int], float] = {}
    position, clock = [0] * pp, [0.0] * pp
    while any(position[r] < len(stage_spans[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while position[r] < len(stage_spans[r]):
                kind, (chunk, i), t0, t1, seconds = stage_spans[r][position[r]]
                virtual = chunk * pp + r
                before = virtual - 1 if kind == "F" else virtual + 1
                dep = (before, kind, i) if 0 <= before <= last else None
                if dep is not None and dep not in end:
                    break
                start = max(clock[r], end[dep] if dep is not None else 0.0)
                clock[r] = end[(virtual, kind, i)] = start + (seconds if cpu else t1 - t0)
                position[r] += 1
                moved = True
        if not moved:
            raise RuntimeError("the recorded events of the stages wait on each other")
    return max(clock)


def mean_durations(stage_spans: list[list[tuple]]) -> list[list[tuple]]:
    """The same events with each one's duration replaced by its stage's mean for its kind (F or B): what the
    schedule gives the stages' average costs without the jitter of single events."""
    out = []
    for spans in stage_spans:
        means = {}
        for kind in ("F", "B"):
            durations = [t1 - t0 for k, _, t0, t1, _ in spans if k == kind]
            means[kind] = sum(durations) / max(len(durations), 1)
        out.append([(k, i, 0.0, means[k], means[k]) for k, i, *_ in spans])
    return out


def coefficient_of_variation(durations: list[float]) -> float:
    """Standard deviation / mean of one kind of event's durations: how much one stage's forward (or backward)
    of the same micro-batch shape varies from event to event."""
    if len(durations) < 2:
        return 0.0
    mean = sum(durations) / len(durations)
    return (sum((d - mean) ** 2 for d in durations) / (len(durations) - 1)) ** 0.5 / mean


def equal_durations(stage_spans: list[list[tuple]]) -> list[list[tuple]]:
    """The same events with every stage's forward (backward) at the mean over all stages: equal stages, the
    case the analytical bubble describes, so its replay checks the schedule's order alone."""
    means = {}
    for kind in ("F", "B"):
        durations = [t1 - t0 for spans in stage_spans for k, _, t0, t1, _ in spans if k == kind]
        means[kind] = sum(durations) / max(len(durations), 1)
    return [[(k, i, 0.0, means[k], means[k]) for k, i, *_ in spans] for spans in stage_spans]


def summarize(pp: int, chunks: int, m: int, stages: list[dict]) -> list[dict]:
    """Per stage: busy, wall, idle (all timed steps, and the step of least wall time), the replay's idle,
    analytical, ratios, per-micro-batch costs, memory."""
    stages = [s[chunks] for s in stages]
    runs = [s["runs"][m] for s in stages]
    n_steps = len(runs[0]["steps"])
    walls = [
        max(r["steps"][k]["end"] for r in runs) - min(r["steps"][k]["start"] for r in runs) for k in range(n_steps)
    ]
    replays = [replay([r["steps"][k]["spans"] for r in runs]) for k in range(n_steps)]
    mean_replays = [replay(mean_durations([r["steps"][k]["spans"] for r in runs])) for k in range(n_steps)]
    equal_replays = [replay(equal_durations([r["steps"][k]["spans"] for r in runs])) for k in range(n_steps)]
    cpu_replays = [replay([r["steps"][k]["spans"] for r in runs], cpu=True) for k in range(n_steps)]
    busy = [[sum(t1 - t0 for _, _, t0, t1, _ in step["spans"]) for step in r["steps"]] for r in runs]
    cpu = [sum(c for step in r["steps"] for *_, c in step["spans"]) for r in runs]
    best = min(range(n_steps), key=lambda k: walls[k])
    bubble = analytical_bubble(pp, m, chunks)
    rows = []
    for rank, (stage, run) in enumerate(zip(stages, runs)):
        spans = [span for step in run["steps"] for span in step["spans"]]
        fwd = sum(t1 - t0 for k, _, t0, t1, _ in spans if k == "F") / (n_steps * m)
        bwd = sum(t1 - t0 for k, _, t0, t1, _ in spans if k == "B") / (n_steps * m)
        jitter = {  # per model chunk (the last holds the output layer), then the mean over chunks
            kind: sum(
                coefficient_of_variation([t1 - t0 for k, (c, _), t0, t1, _ in spans if k == kind and c == chunk])
                for chunk in range(chunks)
            ) / chunks
            for kind in "FB"
        }
        idle = 1 - sum(busy[rank]) / sum(walls)
        idle_best = 1 - busy[rank][best] / walls[best]
        one = stage["one_microbatch_bytes"]
        # Megatron's 1F1B holds min(PP - stage, m) micro-batches; interleaved, its peak of (chunk, micro-batch)
        # forwards (pinned by tests/test_pipeline_schedule.py), each 1 / chunks of the stage's layers
        expected = min(pp - rank, m) if chunks == 1 else run["peak_in_flight"] / chunks
        rows.append({
            "pp": pp, "chunks": chunks, "m": m, "stage": rank, "layers": stage["layers"], "steps": n_steps,
            "wall_s_per_step": sum(walls) / n_steps, "best_wall_s": walls[best],
            "busy_s_per_step": sum(busy[rank]) / n_steps,
            "forward_s": fwd, "backward_s": bwd, "forward_cv": jitter["F"], "backward_cv": jitter["B"],
            "idle": idle, "analytical": bubble, "ratio": idle / bubble,
            "analytical_1f1b": analytical_bubble(pp, m), "ratio_vs_1f1b": idle / analytical_bubble(pp, m),
            "idle_best_step": idle_best, "ratio_best_step": idle_best / bubble,
            "replay_idle": 1 - sum(busy[rank]) / sum(replays),
            "mean_replay_idle": 1 - sum(busy[rank]) / sum(mean_replays),
            "equal_replay_idle": 1 - sum(busy[rank]) / sum(equal_replays),
            "cpu_s_per_microbatch": cpu[rank] / (n_steps * m), "cpu_replay_idle": 1 - cpu[rank] / sum(cpu_replays),
            "peak_in_flight": run["peak_in_flight"],
            "one_microbatch_bytes": one, "peak_bytes": run["peak_bytes"],
            "peak_output_bytes": run["peak_output_bytes"],
            "peak_vs_pp_x_one": run["peak_bytes"] / (pp * one),
            "expected_in_flight": expected, "peak_vs_expected": run["peak_bytes"] / (expected * one),
        })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "\n| PP | chunks | m | stage | layers | F+B ms/mb | CPU ms/mb | idle | replay | CPU replay | analytical | "
        "ratio | in flight | act. MB (1 mb) | peak act. MB | peak / (PP x 1 mb) | peak / (min(PP-stage,m) x 1 mb) | "
        "outputs held MB |\n"
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        layers = ",".join(map(str, r["layers"]))
        print(
            f"| {r['pp']} | {r['chunks']} | {r['m']} | {r['stage']} | {layers} | "
            f"{1e3 * (r['forward_s'] + r['backward_s']):.0f} | "
            f"{1e3 * r['cpu_s_per_microbatch']:.0f} | {r['idle']:.3f} | {r['replay_idle']:.3f} | "
            f"{r['cpu_replay_idle']:.3f} | {r['analytical']:.3f} | {r['ratio']:.2f}x | {r['peak_in_flight']} | "
            f"{r['one_microbatch_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['peak_vs_pp_x_one']:.2f}x | {r['peak_vs_expected']:.2f}x | {r['peak_output_bytes'] / 2**20:.2f} |"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline sizes, one group of processes each")
    p.add_argument("--microbatches", type=int, nargs="+", default=[4, 8], help="micro-batches per step (m)")
    p.add_argument("--virtual-stages", type=int, nargs="+", default=[1, 2],
                   help="model chunks per stage: 1 is 1F1B, more the interleaved schedule (m a multiple of PP)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--query-groups", type=int, default=2)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=256, help="small: the output layer adds to the last stage")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per (PP, m), after one warm-up step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for a PP's processes")
    p.add_argument("--output", help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if any(pp < 2 for pp in args.pp):
        sys.exit("error: --pp: every size must be at least 2 (PP=1 has no bubble)")
    if any(pp > args.layers for pp in args.pp):
        sys.exit(f"error: --pp: more stages than the {args.layers} layers")
    if any(m < 1 for m in args.microbatches) or args.steps < 1 or any(v < 1 for v in args.virtual_stages):
        sys.exit("error: --microbatches, --steps and --virtual-stages must be at least 1")
    if any(pp * v > args.layers for pp in args.pp for v in args.virtual_stages):
        sys.exit(f"error: --pp x --virtual-stages: more virtual stages than the {args.layers} layers")
    try:
        config = llama_config(args)
        mc = ModelConfig(**config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.environ["OMP_NUM_THREADS"] = "1"
    spec = {"config": config, "batch": args.micro_batch_size, "seq": args.seq_length, "seed": args.seed,
            "microbatches": sorted(set(args.microbatches)), "steps": args.steps,
            "virtual": sorted(set(args.virtual_stages))}  # fmt: skip
    cores = os.cpu_count() or 1
    print(
        f"llama, {mc.num_layers} layers, hidden {mc.hidden_size}, {mc.layer_heads(0)} heads / "
        f"{mc.layer_query_groups(0)} groups, MLP {mc.layer_ffn(0)}, vocab {mc.vocab_size} (untied), "
        f"{mc.num_parameters():,} parameters; micro-batch {args.micro_batch_size} x {args.seq_length} tokens, fp32; "
        f"plain autograd, gloo, 1 thread per process, {cores} cores; {args.steps} timed steps after 1 warm-up"
    )
    load_start = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for pp in args.pp:
        t0 = time.perf_counter()
        stages = run_pipeline(pp, spec, args.timeout)
        print(f"PP={pp}: {time.perf_counter() - t0:.0f} s")
        for v in spec["virtual"]:
            for m in spec["microbatches"]:
                if v == 1 or m % pp == 0:
                    rows += summarize(pp, v, m, stages)
    print_table(rows)
    print(
        "\nratio = measured idle / analytical (p-1)/(v m+p-1) of its own schedule (v model chunks a stage; 1F1B: "
        "v = 1); target <= 1.1x. 'vs 1F1B' = measured idle / 1F1B's (p-1)/(m+p-1). Peak activations: target <= 1.0x."
    )
    for pp in args.pp:
        if pp > cores:
            print(f"PP={pp} runs {pp} processes on {cores} cores: its measured idle includes CPU contention "
                  f"(a stage also waits for a core); the PP <= {cores} arm is the meaningful one.")  # fmt: skip
    summary = []
    for pp, v, m in dict.fromkeys((r["pp"], r["chunks"], r["m"]) for r in rows):
        mine = [r for r in rows if (r["pp"], r["chunks"], r["m"]) == (pp, v, m)]
        bubble = analytical_bubble(pp, m, v)
        mean = {
            k: sum(r[k] for r in mine) / len(mine)
            for k in ("idle", "idle_best_step", "replay_idle", "mean_replay_idle", "equal_replay_idle",
                      "cpu_replay_idle", "forward_cv", "backward_cv")
        }
        summary.append({"pp": pp, "chunks": v, "m": m, "analytical": bubble, "mean_idle": mean["idle"],
                        "ratio_mean": mean["idle"] / bubble,
                        "ratio_mean_vs_1f1b": mean["idle"] / analytical_bubble(pp, m),
                        "ratio_max": max(r["ratio"] for r in mine),
                        "ratio_mean_best_step": mean["idle_best_step"] / bubble,
                        "replay_ratio_mean": mean["replay_idle"] / bubble,
                        "mean_replay_ratio_mean": mean["mean_replay_idle"] / bubble,
                        "equal_replay_ratio_mean": mean["equal_replay_idle"] / bubble,
                        "forward_cv_mean": mean["forward_cv"], "backward_cv_mean": mean["backward_cv"],
                        "cpu_replay_ratio_mean": mean["cpu_replay_idle"] / bubble,
                        "peak_vs_pp_x_one_max": max(r["peak_vs_pp_x_one"] for r in mine),
                        "oversubscribed": pp > cores})  # fmt: skip
    print(
        "\nmean over stages\n\n| PP | chunks | m | analytical | mean idle | ratio | vs 1F1B | ratio, best step | "
        "worst stage ratio | replay ratio | mean-duration replay ratio | equal-stage replay ratio | CPU replay ratio | "
        "F / B duration CV | worst peak / (PP x 1 mb) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for s in summary:
        note = " (oversubscribed)" if s["oversubscribed"] else ""
        print(f"| {s['pp']}{note} | {s['chunks']} | {s['m']} | {s['analytical']:.3f} | {s['mean_idle']:.3f} | "
              f"{s['ratio_mean']:.2f}x | {s['ratio_mean_vs_1f1b']:.2f}x | "
              f"{s['ratio_mean_best_step']:.2f}x | {s['ratio_max']:.2f}x | {s['replay_ratio_mean']:.2f}x | "
              f"{s['mean_replay_ratio_mean']:.2f}x | {s['equal_replay_ratio_mean']:.2f}x | "
              f"{s['cpu_replay_ratio_mean']:.2f}x | {s['forward_cv_mean']:.2f} / {s['backward_cv_mean']:.2f} | "
              f"{s['peak_vs_pp_x_one_max']:.2f}x |")  # fmt: skip
    load_end = os.getloadavg()
    print(
        f"load average (1 min) before the first process {load_start[0]:.1f}, at the end {load_end[0]:.1f} (with this "
        f"benchmark's own), on {cores} cores; a load well above 0 before means other jobs shared the cores: "
        "durations and hand-offs are noisier"
    )
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.output:
        result = {"args": vars(args), "config": config, "cores": cores, "load_average": [load_start, load_end],
                  "rows": rows, "summary": summary}  # fmt: skip
        write_text_atomically(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
