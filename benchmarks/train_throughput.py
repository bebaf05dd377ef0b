"""Training throughput and MFU of pretrain_slm.py against a plain transformers loop, arms interleaved.

    python benchmarks/train_throughput.py --teacher runs/teacher [--rounds 3] [--arms hf fp32 bf16 ...]

One student shape (a first-k sub-network of the teacher; default 24 layers, hidden 384, 6 heads / 2 groups,
MLP 1024: 56.6M parameters with SmolLM2's vocabulary), one micro-batch and sequence length, one process.
Every arm is a fresh subprocess that runs ``--warmup`` untimed then ``--steps`` timed steps on the same
synthetic tokens; a round runs every arm once (A B C ... A B C ...), so a load that comes and goes hits
every arm alike. Each ratio is taken within a round and the table gives its median over the rounds, with
min and max.

Arms (``--arms``; default: all but ``compile``, which spends minutes compiling on a CPU):

  hf              transformers LlamaForCausalLM + torch.optim.AdamW, a plain loop (the baseline), fp32
  fp32            pretrain_slm.py, ZeRO-0, no distillation, fp32
  bf16            the same with --bf16 (bf16 weights and activations, fp32 master weights)
  teacher_fp32    the teacher's forward alone, fp32 (to price "student step + one teacher forward")
  teacher_bf16    the same in bf16
  kd_fp32         pretrain_slm.py with distillation (alpha 0.5), student and teacher fp32
  kd_bf16         --bf16 student, bf16 teacher (--teacher-dtype bf16)
  recompute_full  fp32 with --recompute-granularity full
  recompute_sel   fp32 with --recompute-activations (selective)
  compile         fp32 with --compile (timed after the compile, which the warm-up steps absorb)

MFU: model FLOPs (model/flops.py: 3x the forward, recomputation not counted) per second, as pretrain_slm.py
logs them, over this CPU's peak in the arm's dtype: the best 2048x2048 matmul with the same threads that
training/peak.py has seen on this host by the end of the benchmark. Each round starts one arm later than
the last, so no arm always runs right after the same other one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("hf", "fp32", "bf16", "teacher_fp32", "teacher_bf16", "kd_fp32", "kd_bf16", "recompute_full",
        "recompute_sel", "compile")  # fmt: skip
PRETRAIN_FLAGS = {
    "fp32": ["--kd-alpha", "0"],
    "bf16": ["--kd-alpha", "0", "--bf16"],
    "kd_fp32": ["--kd-alpha", "0.5"],
    "kd_bf16": ["--kd-alpha", "0.5", "--bf16", "--teacher-dtype", "bf16"],
    "recompute_full": ["--kd-alpha", "0", "--recompute-granularity", "full"],
    "recompute_sel": ["--kd-alpha", "0", "--recompute-activations"],
    "compile": ["--kd-alpha", "0", "--compile"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher", help="teacher checkpoint (tools/convert_checkpoint.py import)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=[a for a in ARMS if a != "compile"])
    p.add_argument("--rounds", type=int, default=3, help="every arm once per round")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed steps per arm and round (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, default=24, help="student shape: a first-k sub-network of the teacher")
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--query-groups", type=int, default=2)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--output", help="also write every measurement as JSON here")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one in-process arm in this subprocess
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the arms


def run_device() -> str:
    """Where every arm runs: the GPU when there is one (as pretrain_slm.py does), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synthetic_batches(vocab: int, args, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (args.micro_batch_size, args.seq_length + 1)
    return [torch.randint(0, vocab, shape, generator=g).to(run_device()) for _ in range(args.warmup + args.steps)]


def timed_tokens_per_s(step, batches: list, warmup: int) -> float:
    """Tokens/s of ``step(batch)`` over the batches after the first ``warmup``, the device's work included."""
    import torch

    sync = torch.cuda.synchronize if run_device() == "cuda" else (lambda: None)
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start = time.perf_counter()
        step(batch)
    sync()
    return (len(batches) - warmup) * batches[0][:, :-1].numel() / (time.perf_counter() - start)


def hf_arm(args) -> dict:
    """Tokens/s of LlamaForCausalLM + AdamW on the student's shape (the first ``warmup`` steps untimed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.hf import config_to_hf

    config = ModelConfig.load(Path(args.work) / "student_config.json")
    hf_config = config_to_hf(config)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config).float().train().to(run_device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(batch):
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"tokens_per_s": timed_tokens_per_s(step, synthetic_batches(config.vocab_size, args), args.warmup)}


def teacher_arm(args, dtype_name: str) -> dict:
    import torch

    from megatron_subnet.model.weights import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = load_model(args.teacher).to(run_device(), dtype).eval()
    batches = synthetic_batches(model.config.vocab_size, args)
    with torch.no_grad():
        return {"tokens_per_s": timed_tokens_per_s(lambda b: model(b[:, :-1]), batches, args.warmup)}


def pretrain_arm(args, name: str, work: Path) -> dict:
    """Tokens/s and MFU that pretrain_slm.py logs over the timed iterations."""
    log_dir = work / f"log_{name}"
    iters = args.warmup + args.steps
    cmd = [
        sys.executable, str(ROOT / "pretrain_slm.py"), "--ds_config", str(work / "ds_config.json"),
        "--teacher-load", args.teacher, "--subnet", str(work / "subnet.json"), "--data-path", str(work / "tokens"),
        "--split", "100,0,0", "--micro-batch-size", str(args.micro_batch_size), "--seq-length", str(args.seq_length),
        "--train-iters", str(iters), "--log-interval", "1", "--eval-iters", "0", "--eval-interval", str(iters),
        "--lr-warmup-iters", "1", "--log-dir", str(log_dir), "--overwrite", *PRETRAIN_FLAGS[name],
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: pretrain_slm.py ({name}) failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in open(log_dir / "metrics.jsonl") if '"loss"' in line][args.warmup :]
    seconds = sum(1.0 / r["tokens_per_s"] for r in records)  # per token: the harmonic mean is tokens / time
    return {
        "tokens_per_s": len(records) / seconds,
        "mfu": statistics.fmean(r["mfu"] for r in records),
        "total_mfu": statistics.fmean(r["total_mfu"] for r in records),
        "model_tflops": statistics.fmean(r["model_tflops"] for r in records),
    }


def run_arm(args, name: str, work: Path) -> dict:
    if name in PRETRAIN_FLAGS:
        return pretrain_arm(args, name, work)
    cmd = [sys.executable, __file__, "--arm", name, "--work", str(work), "--teacher", args.teacher,
           "--micro-batch-size", str(args.micro_batch_size), "--seq-length", str(args.seq_length),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: arm {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(args, work: Path) -> dict:
    """The student's sub-network and config, a ds_config and a synthetic token dataset in ``work``."""
    import numpy as np

    from megatron_subnet.data.indexed import IndexedDatasetBuilder
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config

    teacher = load_config(args.teacher)
    subnet = SubnetConfig.from_counts(
        teacher, args.layers, args.hidden_size, args.heads, args.query_groups, args.ffn_hidden_size
    )
    student = subnet.student_config(teacher)
    subnet.save(work / "subnet.json")
    student.save(work / "student_config.json")
    (work / "ds_config.json").write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}))
    rng = np.random.default_rng(0)
    samples = (args.warmup + args.steps) * args.micro_batch_size + 1
    with IndexedDatasetBuilder(work / "tokens", np.int32) as builder:
        for _ in range(samples):
            builder.add_document(rng.integers(0, teacher.vocab_size, args.seq_length + 1))
    return {"student_parameters": student.num_parameters(), "teacher_parameters": teacher.num_parameters()}


# ----------------------------------------------------------------------------- ratios


def separate(student: float, teacher: float) -> float:
    """Tokens/s of a student step plus one teacher forward, each measured alone."""
    return 1.0 / (1.0 / student + 1.0 / teacher)


RATIOS = [
    # (name, arms it needs, value from one round's tokens/s, target)
    ("fp32 step vs plain transformers loop", ("fp32", "hf"), lambda r: r["fp32"] / r["hf"], ">= 1.3x"),
    ("fp32 --compile step vs plain transformers loop", ("compile", "hf"), lambda r: r["compile"] / r["hf"],
     ">= 1.3x"),
    ("bf16 step vs our fp32 step", ("bf16", "fp32"), lambda r: r["bf16"] / r["fp32"], ">= 2.0x (AMX hosts)"),
    ("KD step (fp32) vs student step + teacher forward apart", ("kd_fp32", "fp32", "teacher_fp32"),
     lambda r: separate(r["fp32"], r["teacher_fp32"]) / r["kd_fp32"], "<= 1.1x"),
    ("KD step (bf16 student, bf16 teacher) vs the two apart", ("kd_bf16", "bf16", "teacher_bf16"),
     lambda r: separate(r["bf16"], r["teacher_bf16"]) / r["kd_bf16"], "<= 1.0x"),
    ("bf16 teacher forward vs fp32", ("teacher_bf16", "teacher_fp32"),
     lambda r: r["teacher_bf16"] / r["teacher_fp32"], ""),
    ("full recompute vs none", ("recompute_full", "fp32"), lambda r: r["recompute_full"] / r["fp32"], ""),
    ("selective recompute vs none", ("recompute_sel", "fp32"), lambda r: r["recompute_sel"] / r["fp32"], ""),
    ("--compile vs eager", ("compile", "fp32"), lambda r: r["compile"] / r["fp32"], ""),
]  # fmt: skip


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.arm:
        import torch  # noqa: F401 - the arm's own process

        result = hf_arm(args) if args.arm == "hf" else teacher_arm(args, args.arm.split("_")[1])
        print(json.dumps(result))
        return 0
    if not (Path(args.teacher) / "model_config.json").exists():
        sys.exit(f"error: --teacher {args.teacher}: no checkpoint there (tools/convert_checkpoint.py import)")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        sys.exit("error: --rounds, --steps and --warmup must be at least 1")
    flags = sorted(f for f in (open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else [])
                   if f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"))  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    measured: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = prepare(args, work)
        print(
            f"student {sizes['student_parameters']:,} parameters, teacher {sizes['teacher_parameters']:,}; micro-batch "
            f"{args.micro_batch_size} x {args.seq_length} tokens; {args.warmup} + {args.steps} steps per arm; "
            f"{args.rounds} rounds of {', '.join(args.arms)}; OMP_NUM_THREADS={threads}; "
            f"{platform.processor() or platform.machine()}, flags {' '.join(sorted(set(flags))) or 'unknown'}"
        )
        start = time.perf_counter()
        for k in range(args.rounds):
            shift = k % len(args.arms)  # each round starts one arm later: no arm always follows the same one
            for arm in args.arms[shift:] + args.arms[:shift]:
                measured[arm].append(run_arm(args, arm, work))
                m = measured[arm][-1]
                mfu = f", MFU {100 * m['mfu']:.1f}%" if "mfu" in m else ""
                print(f"round {k + 1} {arm}: {m['tokens_per_s']:,.0f} tokens/s{mfu}", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s in all\n")
    # Each run measured the peak anew and kept the best seen on this host; MFU is quoted against the final best
    # (a run that probed while the machine was busy would otherwise divide by a low peak).
    import torch

    from megatron_subnet.training.peak import peak_flops

    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    peaks = {name: peak_flops(run_device(), dtype)[0] for name, dtype in dtypes}
    where = "the GPU table" if run_device() == "cuda" else f"best 2048x2048 matmul seen, {threads} threads"
    print(f"peak per process ({where}): fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n")
    print("| arm | tokens/s (median) | model TFLOP/s (median) | MFU (median) |\n|---|---:|---:|---:|")
    for arm in args.arms:
        rates = [m["tokens_per_s"] for m in measured[arm]]
        tflops = [m["model_tflops"] for m in measured[arm] if "model_tflops" in m]
        for m in measured[arm]:
            if "model_tflops" in m:
                m["mfu_final_peak"] = m["model_tflops"] * 1e12 / peaks["bf16" if "bf16" in arm else "fp32"]
        mfu = [m["mfu_final_peak"] for m in measured[arm] if "mfu_final_peak" in m]
        cells = (f"{statistics.median(tflops):.3f}", f"{100 * statistics.median(mfu):.1f}%") if mfu else ("", "")
        print(f"| {arm} | {statistics.median(rates):,.0f} | {cells[0]} | {cells[1]} |")
    print("\n| ratio (within a round) | median (min, max) over rounds | target |\n|---|---|---|")
    ratios = {}
    for name, needs, value, target in RATIOS:
        if all(a in measured for a in needs):
            per_round = [value({a: measured[a][k]["tokens_per_s"] for a in needs}) for k in range(args.rounds)]
            ratios[name] = per_round
            print(f"| {name} | {spread(per_round)} | {target} |")
    if args.output:
        from megatron_subnet.outputs import write_text_atomically

        result = {"args": vars(args), "sizes": sizes, "cpu_flags": flags, "peaks": peaks, "measured": measured,
                  "ratios": ratios, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        write_text_atomically(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
