"""Where to begin: the same student shape trained from a sub-network of the teacher vs from random weights.

    python benchmarks/init_comparison.py --teacher runs/teacher --subnet search/best_subnet.json

Three pretrain_slm.py runs with the same data, schedule and budget (one process, ZeRO-0):
  1. random init (Megatron's), cross-entropy only — the baseline;
  2. sub-network init, cross-entropy only;
  3. sub-network init with online distillation from the teacher (--kd-alpha).
Prints the validation loss of each at every evaluation and the tokens the baseline needs to reach
the sub-network's starting loss, and plots the three curves (``OUTPUT/init_comparison.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher")
    p.add_argument("--subnet", required=True, help="sub-network JSON (tools/search_subnet.py best_subnet.json)")
    p.add_argument("--data-path", default="data/demo_text_document")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--train-iters", type=int, default=30)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-iters", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--output", default="runs/init_comparison")
    return p.parse_args()


def run(args, name: str, extra: list[str]) -> list[dict]:
    out = Path(args.output) / name
    ds_config = Path(args.output) / "ds_zero0.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}))
    cmd = [
        sys.executable,
        str(ROOT / "pretrain_slm.py"),
        "--ds_config",
        str(ds_config),
        "--teacher-load",
        args.teacher,
        "--subnet",
        args.subnet,
        "--data-path",
        args.data_path,
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--seq-length",
        str(args.seq_length),
        "--train-iters",
        str(args.train_iters),
        "--eval-interval",
        str(args.eval_interval),
        "--eval-iters",
        str(args.eval_iters),
        "--lr",
        str(args.lr),
        "--min-lr",
        str(args.lr / 10),
        "--lr-warmup-iters",
        "2",
        "--log-interval",
        "1",
        "--log-dir",
        str(out),
        "--overwrite",  # a benchmark run replaces its previous metrics
        *extra,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r for r in records if "valid_loss" in r]


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, records in curves.items():
        ax.plot([r["tokens"] for r in records], [r["valid_loss"] for r in records], "o-", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    for path in (args.teacher, args.subnet, f"{args.data_path}.idx"):
        if not os.path.exists(path):
            sys.exit(f"{path}: missing (see README: import the teacher, search, preprocess the data)")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    curves = {
        "random init, CE": run(args, "random", ["--init", "random", "--kd-alpha", "0"]),
        "sub-network init, CE": run(args, "subnet", ["--init", "subnet", "--kd-alpha", "0"]),
        f"sub-network init, KD alpha {args.kd_alpha}": run(
            args, "subnet_kd", ["--init", "subnet", "--kd-alpha", str(args.kd_alpha)]
        ),
    }
    tokens_per_iter = args.micro_batch_size * args.seq_length
    print(f"validation loss (CE) after N tokens; {args.train_iters} iterations of {tokens_per_iter} tokens")
    header = list(curves)
    print("| tokens | " + " | ".join(header) + " |")
    print("|---:|" + "---:|" * len(header))
    for i, record in enumerate(curves[header[0]]):
        print(f"| {record['tokens']} | " + " | ".join(f"{curves[h][i]['valid_loss']:.3f}" for h in header) + " |")
    start = curves[header[1]][0]["valid_loss"]
    reached = [r["tokens"] for r in curves[header[0]] if r["valid_loss"] <= start]
    print(
        f"random init reaches the sub-network's starting loss {start:.3f}: "
        + (f"after {reached[0]} tokens" if reached else f"not within {args.train_iters * tokens_per_iter} tokens")
    )
    plot(curves, Path(args.output) / "init_comparison.png")
    print(f"plot: {Path(args.output) / 'init_comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
