"""Tensor-parallel communication volume per training step against Megatron's, and step time at TP=2 vs TP=1.

    OMP_NUM_THREADS=1 python benchmarks/tp_comm.py [--layers 8 --hidden-size 384 --heads 6 --query-groups 2 \\
        --ffn-hidden-size 1024 --vocab-size 49152 --micro-batch-size 2 --seq-length 256] [--rounds 5] \\
        [--output results.json]

**Bytes.** Two gloo processes (TP=2, DP=1, no DeepSpeed: a plain model, the vocab-parallel loss and a
torch AdamW step, which communicates nothing) run exactly one training step of the student (forward,
``parallel.losses.distillation_loss``, backward, optimizer step) with ``torch.distributed``'s
``all_reduce``, ``all_gather``, ``all_gather_into_tensor``, ``reduce_scatter``, ``reduce_scatter_tensor`` and
``broadcast`` wrapped, adding up per phase and per kind the payload each rank hands in: the tensor of an
all-reduce or broadcast, a rank's own chunk of an all-gather, the whole input of a reduce-scatter.
Bytes are tensor sizes (elements x element size), as Megatron's analytic volumes are; what a ring
all-reduce puts on the wire per rank is 2 (p - 1) / p times that, which at p = 2 is the same number.
A second row does the same with a teacher (KD, alpha 0.5, forward KL, T = 1): the teacher's forward
adds its own all-reduces (forward only).

Megatron's analytical volume for the same shape (b micro-batch, s sequence, h hidden, L layers, e bytes
per activation element; the same for the teacher with its own h_t, L_t), per rank per step:

    student forward   (1 + 2 L) b s h e   embedding all-reduce + per layer one after attention, one after the MLP
    student backward  (2 L + 1) b s h e   per layer the copy_to regions before QKV and before fc1, + the output
                                          layer's input gradient (tied embedding: the same copy_to all-reduce)
    loss, CE          3 b s 4             vocab-parallel CE: max, sum-exp and target-logit reductions (fp32)
    loss, KD          5 b s 4             the CE's 3 + the teacher's max and sum-exp (Megatron-core has no
                                          vocab-parallel KD loss; this is the reference we set for one)
    teacher forward   (1 + 2 L_t) b s h_t e

The ratio is measured / Megatron per phase and for the step; the target is 1.00x (nothing beyond what
Megatron sends). Not counted by either side: a data-parallel gradient all-reduce (DP = 1 here) and the
gradient-norm all-reduce of clipping (not done here).

**Step time.** The same CE step (``--timed-step kd`` for KD) timed in three arms that stay alive side
by side and take turns, round by round (A B C, then C B A, ...): TP=2 (2 processes x 1 thread), TP=1
(1 process x 1 thread) and TP=1 (1 process x 2 threads). Each round times ``--steps`` steps per arm
(after warm-up); the table gives each arm's median seconds per step and, per pair, the median of the
per-round ratios with their min and max (speed-up = the TP=1 arm's time / the TP=2 arm's time).

What the times mean on a 2-core CPU: "1 process x 2 threads" is the fair comparison, both use both cores.
TP=2 gives each core half of every matmul in its own single-threaded process, but adds the gloo
all-reduces (loopback TCP; a rank that arrives first waits) and repeats the replicated work on both ranks
(norms, rotary embedding, residual adds, the optimizer step on replicated weights). Intra-op threading
splits the same matmuls without any of that, but synchronises its threads inside every op, which suffers
most when other jobs share the cores. So the ratio says which way of using two cores is faster on this
machine, not what TP gains on GPUs (there the point is memory per device, and the bytes go over NVLink).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import queue
import socket
import statistics
import sys
import time
import traceback
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
from megatron_subnet.parallel.losses import distillation_loss  # noqa: E402

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
)
PHASES = ("teacher forward", "forward", "loss", "backward", "optimizer")
KD_ALPHA = 0.5


# ----------------------------------------------------------------------------- counting


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def payload_bytes(kind: str, args: tuple, kwargs: dict) -> int:
    """Bytes a rank hands to one collective call (see the module docstring)."""
    if kind in ("all_reduce", "broadcast"):
        return _nbytes(_arg(args, kwargs, 0, "tensor"))
    if kind == "all_gather":
        return _nbytes(_arg(args, kwargs, 1, "tensor"))
    if kind == "all_gather_into_tensor":
        return _nbytes(_arg(args, kwargs, 1, "input_tensor"))
    if kind == "reduce_scatter":
        return sum(_nbytes(t) for t in _arg(args, kwargs, 1, "input_list"))
    if kind == "reduce_scatter_tensor":
        return _nbytes(_arg(args, kwargs, 1, "input"))
    raise ValueError(kind)


class CollectiveCounter:
    """While entered, ``torch.distributed``'s collectives are wrapped and every call adds its payload to
    ``records[(phase, kind)] = [calls, bytes]``; ``with counter.phase(name):`` names the phase."""

    def __init__(self):
        self.current = "other"
        self.records: dict[tuple[str, str], list[int]] = {}
        self._saved: list[tuple[object, str, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def _wrap(self, kind: str, original):
        def wrapped(*args, **kwargs):
            record = self.records.setdefault((self.current, kind), [0, 0])
            record[0] += 1
            record[1] += payload_bytes(kind, args, kwargs)
            return original(*args, **kwargs)

        return wrapped

    def __enter__(self) -> CollectiveCounter:
        from torch.distributed import distributed_c10d

        for module in (dist, distributed_c10d):
            for kind in COLLECTIVES:
                original = getattr(module, kind, None)
                if original is not None:
                    self._saved.append((module, kind, original))
                    setattr(module, kind, self._wrap(kind, original))
        return self

    def __exit__(self, *exc) -> None:
        for module, kind, original in reversed(self._saved):
            setattr(module, kind, original)
        self._saved.clear()

    def by_phase(self) -> dict[str, dict]:
        """{phase: {"calls", "bytes", "kinds": {kind: [calls, bytes]}}}."""
        out: dict[str, dict] = {}
        for (phase, kind), (calls, nbytes) in self.records.items():
            entry = out.setdefault(phase, {"calls": 0, "bytes": 0, "kinds": {}})
            entry["calls"] += calls
            entry["bytes"] += nbytes
            entry["kinds"][kind] = [calls, nbytes]
        return out


# ----------------------------------------------------------------------------- Megatron's volume


def megatron_bytes(student: dict, batch: int, seq: int, teacher: dict | None = None, element: int = 4) -> dict:
    """Megatron's all-reduce bytes per rank per step by phase (module docstring); ``teacher`` adds the KD
    loss's and the teacher forward's."""
    tokens = batch * seq
    L, h = student["num_layers"], student["hidden_size"]
    out = {
        "forward": (1 + 2 * L) * tokens * h * element,
        "backward": (2 * L + 1) * tokens * h * element,
        "loss": (3 if teacher is None else 5) * tokens * 4,
        "optimizer": 0,
    }
    if teacher is not None:
        out["teacher forward"] = (1 + 2 * teacher["num_layers"]) * tokens * teacher["hidden_size"] * element
    return out


FORMULA = (
    "Megatron per rank per step (tensor sizes): forward (1 + 2L) b s h e; backward (2L + 1) b s h e; "
    "loss 3 b s x 4 (CE: max, sum-exp, target logit), KD 5 b s x 4 (+ teacher max, sum-exp); "
    "teacher forward (1 + 2L_t) b s h_t e"
)


# ----------------------------------------------------------------------------- one rank's training step


def llama_config(vocab: int, hidden: int, layers: int, heads: int, groups: int, ffn: int, seq: int, tied: bool) -> dict:
    return ModelConfig(
        arch="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
        num_query_groups=groups, head_dim=hidden // heads, ffn_hidden_size=ffn, tie_word_embeddings=tied,
        rope_theta=100000.0, max_position_embeddings=max(2048, seq),
    ).to_dict()  # fmt: skip


class Runner:
    """The student (and, when ``spec["teacher"]``, a frozen teacher) at this process's TP size, a torch AdamW
    and fixed random batches; the same weights at every TP size (layers draw the full tensor, keep a shard)."""

    def __init__(self, spec: dict):
        self.spec = spec
        torch.manual_seed(spec["seed"])
        self.student = GPTModel(ModelConfig(**spec["student"])).train()
        self.teacher = None
        if spec.get("teacher"):
            self.teacher = GPTModel(ModelConfig(**spec["teacher"])).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-4, weight_decay=0.1)
        g = torch.Generator().manual_seed(spec["seed"] + 1)
        vocab = spec["student"]["vocab_size"]
        self.batches = [torch.randint(0, vocab, (spec["batch"], spec["seq"] + 1), generator=g) for _ in range(4)]
        self.steps = 0

    def step(self, kd: bool, counter: CollectiveCounter | None = None) -> float:
        phase = counter.phase if counter is not None else (lambda name: contextlib.nullcontext())
        tokens = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        teacher_logits = None
        if kd:
            with phase("teacher forward"), torch.no_grad():
                teacher_logits = self.teacher(inputs)
        with phase("forward"):
            logits = self.student(inputs)
        with phase("loss"):
            loss, _, _ = distillation_loss(logits, labels, teacher_logits, KD_ALPHA if kd else 0.0)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def count(self, kd: bool) -> dict:
        with CollectiveCounter() as counter:
            loss = self.step(kd, counter)
        return {"loss": loss, "phases": counter.by_phase()}

    def time(self, kd: bool, steps: int) -> float:
        """Seconds per step over ``steps`` steps, between barriers of the TP group."""
        state.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(kd)
        state.barrier()
        return (time.perf_counter() - start) / steps


def count_one_step(rank: int, spec: dict, kd: bool) -> dict:
    """For ``tests/distributed.run_distributed``: one counted step in an already initialised process."""
    return Runner(spec).count(kd)


# ----------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, threads: int, spec: dict, commands, results) -> None:
    """One rank of an arm: build the models, then run commands until "stop"."""
    torch.set_num_threads(threads)
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
            state.initialize_model_parallel(world)
        runner = Runner(spec)
        results.put((rank, True, pickle.dumps("ready")))
        while True:
            cmd, *rest = commands.get()
            if cmd == "stop":
                break
            value = runner.count(*rest) if cmd == "count" else runner.time(*rest)
            results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Arm:
    """``world`` processes of ``threads`` threads each (TP = world), alive until ``close``."""

    def __init__(self, name: str, world: int, threads: int, spec: dict, timeout: float):
        ctx = mp.get_context("spawn")
        self.name, self.world, self.threads, self.timeout = name, world, threads, timeout
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, port, threads, spec, self.commands[r], self.results))
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self._collect()

    def _collect(self) -> list:
        out = {}
        try:
            for _ in range(self.world):
                rank, ok, value = self.results.get(timeout=self.timeout)
                if not ok:
                    raise RuntimeError(f"{self.name}, rank {rank} failed:\n{value}")
                out[rank] = pickle.loads(value)
        except queue.Empty:
            raise RuntimeError(
                f"{self.name}: no answer after {self.timeout}s from ranks {set(range(self.world)) - set(out)}"
            ) from None
        return [out[r] for r in range(self.world)]

    def call(self, *cmd) -> list:
        for q in self.commands:
            q.put(cmd)
        return self._collect()

    def close(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------------------------- report


def compare(measured: dict, reference: dict) -> list[dict]:
    """Rows per phase (those with bytes on either side) plus the total."""
    rows = []
    for phase in PHASES + tuple(sorted(set(measured) - set(PHASES))):
        got = measured.get(phase, {"calls": 0, "bytes": 0, "kinds": {}})
        ref = reference.get(phase, 0)
        if got["bytes"] or ref:
            rows.append({"phase": phase, "calls": got["calls"], "kinds": got["kinds"], "bytes": got["bytes"],
                         "megatron_bytes": ref, "ratio": got["bytes"] / ref if ref else None})  # fmt: skip
    total, ref = sum(r["bytes"] for r in rows), sum(r["megatron_bytes"] for r in rows)
    rows.append({"phase": "step total", "calls": sum(r["calls"] for r in rows), "kinds": {}, "bytes": total,
                 "megatron_bytes": ref, "ratio": total / ref})  # fmt: skip
    return rows


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_bytes(name: str, rows: list[dict]) -> None:
    for r in rows:
        kinds = ", ".join(f"{k} {c}" for k, (c, _) in sorted(r["kinds"].items()) if k != "all_reduce")
        print(
            f"| {name} | {r['phase']} | {r['calls']}{' (' + kinds + ')' if kinds else ''} | {r['bytes']:,} | "
            f"{r['megatron_bytes']:,} | {_ratio(r['ratio'])} |"
        )


def summarize_times(times: dict[str, list[float]], tokens: int, tp_arm: str) -> tuple[list[dict], list[dict]]:
    """Each arm's median seconds per step, and the per-round speed-ups of ``tp_arm`` over each TP=1 arm."""
    arms = [{"arm": a, "median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "rounds": t}
            for a, t in times.items()]  # fmt: skip
    pairs = []
    for base in times:
        if base != tp_arm:
            ratios = [b / t for b, t in zip(times[base], times[tp_arm])]
            pairs.append({"speedup_of": tp_arm, "over": base, "median": statistics.median(ratios),
                          "min": min(ratios), "max": max(ratios), "per_round": ratios})  # fmt: skip
    return arms, pairs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=49152, help="SmolLM2's (divisible by the TP size)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--query-groups", type=int, default=2)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--untied", action="store_true", help="separate output layer (default: tied, as SmolLM2)")
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--teacher-hidden-size", type=int, default=576)
    p.add_argument("--teacher-heads", type=int, default=8)
    p.add_argument("--teacher-query-groups", type=int, default=2)
    p.add_argument("--teacher-ffn-hidden-size", type=int, default=1536)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds; each times every arm once (0: no timing)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per arm per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arm before the rounds")
    p.add_argument("--timed-step", choices=("ce", "kd"), default="ce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for any one answer of an arm")
    p.add_argument("--output", help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tp = args.tensor_model_parallel_size
    if tp < 2:
        sys.exit("error: --tensor-model-parallel-size: must be at least 2 (nothing is communicated at 1)")
    seq, b = args.seq_length, args.micro_batch_size
    tied = not args.untied
    try:
        student = llama_config(args.vocab_size, args.hidden_size, args.layers, args.heads, args.query_groups,
                               args.ffn_hidden_size, seq, tied)  # fmt: skip
        teacher = llama_config(args.vocab_size, args.teacher_hidden_size, args.teacher_layers, args.teacher_heads,
                               args.teacher_query_groups, args.teacher_ffn_hidden_size, seq, tied)  # fmt: skip
    except ValueError as e:
        sys.exit(f"error: {e}")
    spec = {"student": student, "teacher": teacher, "batch": b, "seq": seq, "seed": args.seed}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sc, tc = ModelConfig(**student), ModelConfig(**teacher)
    print(
        f"student: llama, {sc.num_layers} layers, hidden {sc.hidden_size}, {sc.layer_heads(0)} heads / "
        f"{sc.layer_query_groups(0)} groups, MLP {sc.layer_ffn(0)}, vocab {sc.vocab_size}, "
        f"{'tied' if tied else 'untied'}: {sc.num_parameters():,} parameters "
        f"({sc.num_parameters(False):,} without embeddings); teacher {tc.num_layers} layers, hidden "
        f"{tc.hidden_size}: {tc.num_parameters():,}; micro-batch {b} x {seq} tokens, fp32"
    )
    start = time.perf_counter()
    arms: dict[str, Arm] = {}
    result: dict = {"args": vars(args), "formula": FORMULA, "student": student, "teacher": teacher}
    try:
        tp_arm = f"TP={tp}, {tp} x 1 thread"
        arms[tp_arm] = Arm(tp_arm, tp, 1, spec, args.timeout)
        counted = {}
        for kd in (False, True):
            per_rank = arms[tp_arm].call("count", kd)
            phases = [r["phases"] for r in per_rank]
            if any(p != phases[0] for p in phases):
                sys.exit(f"error: the ranks counted different bytes: {phases}")
            counted["kd" if kd else "ce"] = (per_rank[0]["loss"], phases[0])
        print(f"\nbytes all-reduced per rank in one training step, TP={tp}, DP=1 (tensor sizes; equal on every rank)")
        print(FORMULA)
        print("\n| step | phase | calls | bytes | Megatron | ratio |\n|---|---|---:|---:|---:|---:|")
        result["bytes"] = {}
        for name, (loss, phases) in counted.items():
            rows = compare(phases, megatron_bytes(student, b, seq, teacher if name == "kd" else None))
            print_bytes(name.upper(), rows)
            result["bytes"][name] = {"loss": loss, "rows": rows}
        if args.rounds > 0:
            for name, threads in (("TP=1, 1 x 1 thread", 1), (f"TP=1, 1 x {tp} threads", tp)):
                arms[name] = Arm(name, 1, threads, spec, args.timeout)
            # the first CE step of every arm sees the same weights and batch: its loss checks the TP run
            losses = {name: arm.call("count", False)[0]["loss"] for name, arm in arms.items() if arm.world == 1}
            kd = args.timed_step == "kd"
            for arm in arms.values():
                if args.warmup:
                    arm.call("time", kd, args.warmup)
            times: dict[str, list[float]] = {name: [] for name in arms}
            order = list(arms)
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    times[name].append(arms[name].call("time", kd, args.steps)[0])
            arm_rows, pairs = summarize_times(times, b * seq, tp_arm)
            print(
                f"\n{args.timed_step.upper()} step time, {args.rounds} rounds x {args.steps} steps per arm, "
                f"arms interleaved (first CE step's loss: TP={tp} {counted['ce'][0]:.5f}, "
                + ", ".join(f"{k} {v:.5f}" for k, v in losses.items())
                + ")\n\n| arm | median s/step | tokens/s | per round |\n|---|---:|---:|---|"
            )
            for a in arm_rows:
                print(f"| {a['arm']} | {a['median_s']:.3f} | {a['tokens_per_s']:,.0f} | "
                      f"{' '.join(f'{t:.2f}' for t in a['rounds'])} |")  # fmt: skip
            for p in pairs:
                print(f"TP={tp} speed-up over {p['over']}: {p['median']:.2f}x median of per-round ratios "
                      f"(min {p['min']:.2f}x, max {p['max']:.2f}x)")  # fmt: skip
            result["time"] = {"step": args.timed_step, "arms": arm_rows, "speedups": pairs}
    finally:
        for arm in arms.values():
            arm.close()
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.output:
        write_text_atomically(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
