"""Progress bar, metrics.jsonl, TensorBoard (when installed) and the loss-curve plot; rank 0 only."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_subnet.outputs import write_file_atomically, write_text_atomically


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drop_records_after(path: Path, iteration: int) -> None:
    """Keep the records of ``path`` written up to the checkpoint of ``iteration``: those of earlier iterations
    and that iteration's own step and evaluation (a test loss comes after the checkpoint); a line cut short by
    a crash goes too. Rewritten atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        at = record.get("iteration", 0) if isinstance(record, dict) else iteration + 1
        if at < iteration or (at == iteration and "test_loss" not in record):
            kept.append(line)
    write_text_atomically(path, "".join(f"{line}\n" for line in kept))


class MetricsLogger:
    """Appends one JSON object per record to ``log_dir/metrics.jsonl`` (``fresh`` starts the file anew). A run
    resumed at iteration ``start_iter`` first drops the records the interrupted run wrote after that
    checkpoint, which it is about to write again: one record per iteration, the resumed run's."""

    def __init__(
        self, log_dir: str | Path, enabled: bool, total_iters: int, start_iter: int = 0, fresh: bool = False
    ):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.bar = None
        self.writer = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        if start_iter and not fresh and self.path.exists():
            drop_records_after(self.path, start_iter)
        self.file = open(self.path, "w" if fresh else "a", buffering=1)
        self.bar = tqdm(total=total_iters, initial=start_iter, desc="training", unit="it", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir / "tensorboard"))
        except ImportError:
            self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        iteration = record.get("iteration", 0)
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, iteration)
        if "loss" in record:
            extra = {"mfu": f"{100 * record['mfu']:.1f}%"} if "mfu" in record else {}
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", **extra
            )
        if "valid_loss" in record:
            self.bar.write(
                f"iteration {iteration}: valid loss {record['valid_loss']:.4f}, ppl {record['valid_ppl']:.2f}"
            )
        if "test_loss" in record:
            self.bar.write(f"test loss {record['test_loss']:.4f}, ppl {record['test_ppl']:.2f}")

    def advance(self, iterations: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(iterations)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self, plot: bool = True) -> None:
        """End the progress bar, close the files and (``plot``) draw the loss curve; later calls do nothing."""
        if not self.enabled or self.file.closed:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if plot:
            plot_loss_curve(self.path, self.log_dir / "loss_curve.png")


def plot_loss_curve(metrics_path: Path, output: Path) -> None:
    """Training loss (and CE/KD parts) and validation loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(metrics_path) if line.strip()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if any(r.get("kd") is not None for r in train):
        ax.plot([r["tokens"] for r in train], [r["ce"] for r in train], label="train CE", lw=1, alpha=0.7)
    if valid:
        ax.plot([r["tokens"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid loss (CE)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_file_atomically(output, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
