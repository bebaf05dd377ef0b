"""The Python half of ``benchmarks/gpu_check.sh``: the environment report, the attention-kernel probe, the
throughput runs' workspace and the summary.

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py attention [--cpu]        # which SDPA kernels take our attention
    python benchmarks/gpu_check.py prepare WORK [--cpu]     # parent, ~1B config, tokens, ds_config in WORK
    python benchmarks/gpu_check.py summary LOGS             # markdown from LOGS/steps.tsv, attention.json, runs/

No trained weights travel to the GPU machine (its tree is capped at 64 MiB): throughput and MFU need none, so
the parent is a random-init model of SmolLM2-135M's shape, saved here. ``--cpu`` shrinks every shape so the
same wiring runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M's shape (the project's real teacher), and a ~1B llama student of the same vocabulary.
SHAPES = {
    "gpu": {
        "parent": dict(arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_attention_heads=9,
                       num_query_groups=3, head_dim=64, ffn_hidden_size=1536, tie_word_embeddings=True,
                       rope_theta=100000.0, max_position_embeddings=8192),
        "1b": dict(arch="llama", vocab_size=49152, hidden_size=2048, num_layers=16, num_attention_heads=32,
                   num_query_groups=8, head_dim=64, ffn_hidden_size=5632, tie_word_embeddings=True,
                   max_position_embeddings=8192),
    },
    "cpu": {
        "parent": dict(arch="llama", vocab_size=512, hidden_size=64, num_layers=4, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, ffn_hidden_size=128, tie_word_embeddings=True),
        "1b": dict(arch="llama", vocab_size=512, hidden_size=96, num_layers=2, num_attention_heads=6,
                   num_query_groups=2, head_dim=16, ffn_hidden_size=192, tie_word_embeddings=True),
    },
}  # fmt: skip


def report_environment() -> None:
    """Versions, the device and its peak, and whether DeepSpeed imports."""
    import torch

    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{platform.machine()}")  # fmt: skip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU {p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability "
              f"{p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}, "
              f"NCCL {torch.cuda.nccl.version()}")  # fmt: skip
        from megatron_subnet.training.peak import peak_flops

        for dtype in (torch.bfloat16, torch.float32):
            print(f"peak {dtype}: {peak_flops('cuda', dtype)[0] / 1e12:.1f} TFLOP/s ({peak_flops('cuda', dtype)[1]})")
    else:
        print("no CUDA device: CPU only")
    from importlib.metadata import PackageNotFoundError, version

    for name in ("deepspeed", "transformers", "safetensors", "pydantic", "hjson", "typing_extensions"):
        try:
            __import__(name)
            print(f"{name} {version(name.replace('_', '-'))}")
        except (ImportError, PackageNotFoundError) as e:
            print(f"{name}: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - an import that fails otherwise is reported, and the report goes on
            print(f"{name}: import failed: {type(e).__name__}: {e}")


def _sdpa_kernels(fn) -> list[str]:
    """The scaled-dot-product-attention kernels ``fn()`` ran, forward and backward (aten op names in the
    profiler, less their ``aten::_scaled_dot_product_`` prefix)."""
    from torch.profiler import ProfilerActivity, profile

    prefix = "aten::_scaled_dot_product_"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name.removeprefix(prefix) for e in prof.events() if e.name.startswith(prefix)})


def _refusal(error: RuntimeError, caught: list) -> str:
    """Why SDPA refused a kernel: its warnings name the reason, the error only says that none was left."""
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if "attention" in str(w.message).lower()]
    return "refused: " + ("; ".join(reasons[:2]) if reasons else str(error).strip().splitlines()[0])[:160]


def probe_attention(cpu: bool) -> list[dict]:
    """Each SDPA kernel on our attention call (``model/gpt.py:core_attention``: rotary, causal, grouped-query)
    at the throughput runs' shapes: accepted or refused, forward+backward milliseconds; and which kernel the
    default dispatch picks."""
    import torch

    from megatron_subnet.model.config import ModelConfig

    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    batch, seq = (2, 64) if cpu else (4, 2048)
    dtypes = (torch.bfloat16,) if device == "cuda" else (torch.float32, torch.bfloat16)
    return [
        {"shape": name, "dtype": str(dtype).removeprefix("torch."),
         **_attention_kernels(ModelConfig(**shape), dtype, device, batch, seq)}
        for name, shape in SHAPES["cpu" if cpu else "gpu"].items()
        for dtype in dtypes
    ]  # fmt: skip


def _attention_kernels(config, dtype, device: str, batch: int, seq: int) -> dict:
    """``default``: the kernels the default dispatch ran; per SDPA backend its time or why it refused."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_subnet.model.gpt import core_attention, rotary_cos_sin

    cos, sin = rotary_cos_sin(config, seq, torch.device(device))
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(batch, config.num_attention_heads, seq, config.head_dim, generator=g, device=device)
    k, v = (torch.randn(batch, config.num_query_groups, seq, config.head_dim, generator=g, device=device)
            for _ in range(2))  # fmt: skip
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))

    def step():
        core_attention(q, k, v, cos, sin).float().square().mean().backward()

    row = {"default": _sdpa_kernels(step)}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):  # fmt: skip
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
            warnings.simplefilter("always")
            try:
                row[backend.name] = f"{_milliseconds(step, device):.2f} ms"
            except RuntimeError as e:
                row[backend.name] = _refusal(e, caught)
    return row


def _milliseconds(fn, device: str, repeats: int = 5) -> float:
    """Median wall time of ``fn`` after one warm-up, device work included."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def prepare(work: Path, cpu: bool, iters: int, seq: int, micro: int) -> None:
    """The random-init parent (a checkpoint), its full sub-network, the ~1B config, tokens, a ds_config."""
    import numpy as np
    import torch

    from megatron_subnet.data.indexed import IndexedDatasetBuilder
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import save_checkpoint

    shapes = SHAPES["cpu" if cpu else "gpu"]
    parent, one_b = ModelConfig(**shapes["parent"]), ModelConfig(**shapes["1b"])
    torch.manual_seed(0)
    save_checkpoint(work / "parent", parent, GPTModel(parent).state_dict())
    SubnetConfig.full(parent).save(work / "parent_subnet.json")
    one_b.save(work / "llama_1b.json")
    print(f"parent (SmolLM2-135M's shape, random init): {parent.num_parameters():,} parameters; "
          f"1b student: {one_b.num_parameters():,}")  # fmt: skip
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(work / "tokens", np.int32) as builder:
        for _ in range(iters * micro + 8):
            builder.add_document(rng.integers(0, parent.vocab_size, seq + 1))
    (work / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}))


def summarize(logs: Path, warmup: int = 2) -> str:
    """summary.md: each step's outcome, the attention probe, and per run the median over the steps after
    ``warmup`` of tokens/s, model TFLOP/s, MFU and MFU with the teacher's forward counted."""
    lines = ["## Steps", "", "| step | outcome | seconds |", "|---|---|---:|"]
    steps = [line.split("\t") for line in (logs / "steps.tsv").read_text().splitlines() if line.strip()]
    lines += [f"| {name} | {outcome} | {seconds} |" for name, outcome, seconds in steps]
    if (logs / "env.log").exists():
        lines += ["", "## Environment", "", "```", (logs / "env.log").read_text().strip(), "```"]
    attention = logs / "attention.json"
    if attention.exists():
        rows = json.loads(attention.read_text())
        backends = [k for k in rows[0] if k not in ("shape", "dtype", "default")] if rows else []
        lines += ["", "## Attention kernels (our rotary causal GQA call, forward + backward)", "",
                  "| shape | dtype | default dispatch | " + " | ".join(backends) + " |",
                  "|---|---|---|" + "---|" * len(backends)]  # fmt: skip
        for r in rows:
            cells = [r["shape"], r["dtype"], ", ".join(r["default"]) or "?", *(r[b] for b in backends)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Throughput (pretrain_slm.py, one device; median after the warm-up steps)", "",
              "| run | steps | tokens/s | model TFLOP/s | MFU | total MFU (with teacher) | peak memory GB |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in [step.removeprefix("run_") for step, *_ in steps if step.startswith("run_")]:
        path = logs / "runs" / f"{name}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line] if path.exists() else []
        timed = rows[warmup:] or rows
        if not timed:
            lines.append(f"| {name} | 0 | | | | | |")
            continue
        med = {key: statistics.median(r[key] for r in timed) for key in ("tokens_per_s", "model_tflops", "mfu",
                                                                          "total_mfu")}  # fmt: skip
        lines.append(
            f"| {name} | {len(rows)} | {med['tokens_per_s']:,.0f} | {med['model_tflops']:.3g} | "
            f"{100 * med['mfu']:.1f}% | {100 * med['total_mfu']:.1f}% | "
            f"{max(r['peak_memory_mb'] for r in rows) / 1024:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    attention = sub.add_parser("attention")
    attention.add_argument("--cpu", action="store_true")
    attention.add_argument("--output", type=Path, required=True, help="the rows as JSON")
    work = sub.add_parser("prepare")
    work.add_argument("work", type=Path)
    work.add_argument("--cpu", action="store_true")
    for flag in ("--iters", "--seq-length", "--micro-batch-size"):
        work.add_argument(flag, type=int, required=True)
    summary = sub.add_parser("summary")
    summary.add_argument("logs", type=Path)
    args = p.parse_args(argv)
    if args.command == "env":
        report_environment()
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if _has("nvidia-smi") else None
        print(smi.stdout if smi is not None else "nvidia-smi: not found")
    elif args.command == "attention":
        rows = probe_attention(args.cpu)
        args.output.write_text(json.dumps(rows, indent=1))
        for row in rows:
            print(json.dumps(row))
    elif args.command == "prepare":
        prepare(args.work, args.cpu, args.iters, args.seq_length, args.micro_batch_size)
    else:
        print(summarize(args.logs), end="")
    return 0


def _has(command: str) -> bool:
    import shutil

    return shutil.which(command) is not None


if __name__ == "__main__":
    sys.exit(main())
