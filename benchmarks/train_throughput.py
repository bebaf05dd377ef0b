"""Training throughput of pretrain_slm.py against a plain transformers loop, measured in one run.

    python benchmarks/train_throughput.py --teacher runs/teacher --data-path data/demo_text_document

Measures, on the same student shape, micro-batch and sequence length (one process):
  1. baseline: transformers' LlamaForCausalLM + torch AdamW, a plain forward/backward/step loop;
  2. pretrain_slm.py without distillation (--kd-alpha 0), tokens/s from its metrics.jsonl;
  3. pretrain_slm.py with the teacher (--kd-alpha 0.5);
  4. the teacher's forward alone, to price "student step + one teacher forward".
Prints tokens/s for each and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_subnet.model.gpt import GPTModel  # noqa: E402
from megatron_subnet.model.hf import config_to_hf  # noqa: E402
from megatron_subnet.model.subnet import SubnetConfig  # noqa: E402
from megatron_subnet.model.weights import load_checkpoint  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher", help="teacher checkpoint (tools/convert_checkpoint.py import)")
    p.add_argument("--data-path", default="data/demo_text_document")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, default=24, help="student shape: a first-k sub-network of the teacher")
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--query-groups", type=int, default=2)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1], help="ZeRO stages to run pretrain_slm at")
    return p.parse_args()


def plain_transformers_loop(student_config, batches: list[torch.Tensor], warmup: int) -> float:
    """Tokens/s of LlamaForCausalLM + AdamW on ``batches`` (the first ``warmup`` untimed)."""
    from transformers import AutoModelForCausalLM

    hf_config = config_to_hf(student_config)
    hf_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = (len(batches) - warmup) * batches[0][:, :-1].numel()
    return tokens / (time.perf_counter() - start)


@torch.no_grad()
def teacher_forward(teacher_config, teacher_state, batches: list[torch.Tensor], warmup: int) -> float:
    model = GPTModel(teacher_config)
    model.load_state_dict(teacher_state)
    model.eval()
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        model(batch[:, :-1])
    tokens = (len(batches) - warmup) * batches[0][:, :-1].numel()
    return tokens / (time.perf_counter() - start)


def pretrain_slm(args, subnet_path: str, kd_alpha: float, work: str, zero_stage: int) -> float:
    """Tokens/s that pretrain_slm.py logs, averaged over the iterations after warm-up."""
    ds_config = os.path.join(work, f"ds{zero_stage}.json")
    Path(ds_config).write_text(json.dumps({"zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0}))
    log_dir = os.path.join(work, f"kd{kd_alpha}-zero{zero_stage}")
    iters = args.warmup + args.steps
    cmd = [
        sys.executable,
        str(ROOT / "pretrain_slm.py"),
        "--ds_config",
        ds_config,
        "--teacher-load",
        args.teacher,
        "--subnet",
        subnet_path,
        "--data-path",
        args.data_path,
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--seq-length",
        str(args.seq_length),
        "--train-iters",
        str(iters),
        "--log-interval",
        "1",
        "--eval-iters",
        "0",
        "--eval-interval",
        str(iters),
        "--kd-alpha",
        str(kd_alpha),
        "--log-dir",
        log_dir,
        "--overwrite",  # a benchmark run replaces its previous metrics
        "--lr-warmup-iters",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"pretrain_slm.py failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl")) if '"loss"' in line]
    timed = [r["tokens_per_s"] for r in records[args.warmup :]]
    return len(timed) / sum(1.0 / t for t in timed)  # harmonic mean = total tokens / total time


def main() -> int:
    args = parse_args()
    for path, hint in (
        (args.teacher, "tools/convert_checkpoint.py import"),
        (f"{args.data_path}.idx", "tools/preprocess_data.py (make quickstart)"),
    ):
        if not os.path.exists(path):
            sys.exit(f"{path}: missing; make it with {hint}")
    torch.manual_seed(0)
    teacher_config, teacher_state = load_checkpoint(args.teacher)
    subnet = SubnetConfig.from_counts(
        teacher_config, args.layers, args.hidden_size, args.heads, args.query_groups, args.ffn_hidden_size
    )
    student_config = subnet.student_config(teacher_config)
    batches = [
        torch.randint(0, teacher_config.vocab_size, (args.micro_batch_size, args.seq_length + 1))
        for _ in range(args.warmup + args.steps)
    ]
    print(
        f"student: {student_config.num_parameters():,} parameters; micro batch {args.micro_batch_size} x "
        f"{args.seq_length} tokens, {torch.get_num_threads()} threads, {args.steps} timed steps"
    )
    with tempfile.TemporaryDirectory() as work:
        subnet_path = os.path.join(work, "subnet.json")
        subnet.save(subnet_path)
        baseline = plain_transformers_loop(student_config, batches, args.warmup)
        print(f"plain transformers LlamaForCausalLM + AdamW: {baseline:,.0f} tokens/s")
        for stage in args.zero_stages:
            student = pretrain_slm(args, subnet_path, 0.0, work, stage)
            print(
                f"pretrain_slm.py ZeRO-{stage}, no KD: {student:,.0f} tokens/s -> {student / baseline:.2f}x the "
                "plain loop (target >= 1.0x, goal 1.3x)"
            )
            teacher = teacher_forward(teacher_config, teacher_state, batches, args.warmup)
            print(f"teacher forward alone: {teacher:,.0f} tokens/s")
            kd = pretrain_slm(args, subnet_path, 0.5, work, stage)
            separate = 1.0 / (1.0 / student + 1.0 / teacher)
            print(
                f"pretrain_slm.py ZeRO-{stage}, KD: {kd:,.0f} tokens/s; student step + teacher forward measured "
                f"apart: {separate:,.0f} tokens/s -> the KD step costs {separate / kd:.2f}x of the two "
                "(target <= 1.1x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
