"""Command-line flags of pretrain_slm.py (Megatron-LM names where Megatron has the flag), parsed into the
trainer's ``TrainConfig``: one flag's range is checked here, every check across flags in ``TrainConfig.validate``."""

from __future__ import annotations

import argparse

from megatron_subnet.cli import ArgumentParser, finite_float, fraction, nonnegative_int, positive_float, positive_int
from megatron_subnet.parallel.losses import KD_LOSSES, KD_TEMPERATURE_RANGE
from megatron_subnet.training.config import ArgumentError, TrainConfig

__all__ = ["ArgumentError", "build_parser", "parse_config"]


def layer_counts(text: str) -> list[int]:
    """``8,8,7,7``: a positive layer count per pipeline stage."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer counts") from None
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: every stage needs at least one layer")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Pretrain a small LM cut from a sub-network of a parent LLM, with online distillation from a "
        "teacher (DeepSpeed ZeRO).",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--init",
        choices=["subnet", "random"],
        default="subnet",
        help="student weights: cut from the parent (--parent-load, --subnet) or Megatron's random init",
    )
    g.add_argument(
        "--parent-load",
        help="parent checkpoint the sub-network is cut from (its weights, the student's shape with --subnet, the "
        "tokenizer of the final model); default: --teacher-load",
    )
    g.add_argument("--teacher-load", help="teacher checkpoint, who distils (tools/convert_checkpoint.py import)")
    g.add_argument("--subnet", help="sub-network JSON of the parent (tools/search_subnet.py output, or counts)")
    g.add_argument("--importance", help="importance scores for a counts sub-network with order 'importance'")
    g.add_argument("--model-config", help="student ModelConfig JSON for --init random without a teacher")
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--kd-alpha", type=fraction, default=0.5, help="loss = (1-alpha)*CE + alpha*T^2*KL; 0 loads no teacher"
    )
    g.add_argument(
        "--kd-temperature", type=finite_float, default=1.0,
        help=f"softmax temperature T of the KL term, in [{KD_TEMPERATURE_RANGE[0]}, {KD_TEMPERATURE_RANGE[1]}] (beyond "
        "it T^2 and the tempered logits leave the range where fp32 computes the loss stably)",
    )  # fmt: skip
    g.add_argument("--kd-loss", choices=KD_LOSSES, default=KD_LOSSES[0])
    g.add_argument("--kd-topk", type=positive_int, default=64, help="teacher tokens kept by topk_kl")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True, help="prefix, or weighted prefixes '0.3 a 0.7 b'")
    g.add_argument("--split", default="949,50,1")
    g.add_argument("--seq-length", type=positive_int, default=512)
    g.add_argument("--data-cache-path", help="where the sample indices are cached (default: beside the data)")
    g.add_argument(
        "--extra-valid-data-path",
        help="a second held-out text: every evaluation also scores --eval-iters batches of this dataset prefix "
        "(all its documents), logged as extra_valid_loss",
    )
    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=positive_int, required=True)
    g.add_argument("--global-batch-size", type=positive_int, help="default: micro batch x data-parallel size")
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=positive_int)
    g.add_argument("--train-tokens", type=positive_int, help="alternative to --train-iters")
    g.add_argument("--lr", type=finite_float, default=3e-4)
    g.add_argument("--min-lr", type=finite_float, default=3e-5)
    g.add_argument("--lr-warmup-iters", type=nonnegative_int, default=0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant", "wsd"], default="cosine")
    g.add_argument("--lr-wsd-decay-iters", type=positive_int, help="final decay iterations of the WSD schedule")
    g.add_argument("--weight-decay", type=finite_float, default=0.1)
    g.add_argument("--adam-beta1", type=finite_float, default=0.9)
    g.add_argument("--adam-beta2", type=finite_float, default=0.95)
    g.add_argument("--adam-eps", type=finite_float, default=1e-8)
    g.add_argument("--clip-grad", type=finite_float, default=1.0, help="gradient clipping (ds_config's)")
    g.add_argument(
        "--max-skipped-steps", type=positive_int, default=10, help="abort after this many NaN/Inf steps in a row"
    )
    g.add_argument("--seed", type=nonnegative_int, default=1234)
    g = p.add_argument_group("precision and speed")
    g.add_argument(
        "--bf16", action="store_true",
        help="bf16 training: bf16 weights and activations, fp32 master weights and optimizer state (ds_config bf16)",
    )  # fmt: skip
    g.add_argument(
        "--teacher-dtype", choices=["fp32", "bf16"], help="the frozen teacher's precision (default: the student's)"
    )
    g.add_argument(
        "--recompute-activations", action="store_true",
        help="recompute the attention core in the backward pass (Megatron's; = --recompute-granularity selective)",
    )  # fmt: skip
    g.add_argument(
        "--recompute-granularity", choices=["full", "selective"],
        help="full: keep only each layer's input and rerun the layer in backward; selective: the attention core only",
    )  # fmt: skip
    g.add_argument("--compile", action="store_true", help="torch.compile the student's and teacher's layers")
    g.add_argument(
        "--peak-tflops", type=positive_float,
        help="the device's peak TFLOP/s for MFU (default: a table for known GPUs, a measured matmul on CPUs)",
    )  # fmt: skip
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument(
        "--pipeline-layer-split", type=layer_counts,
        help="student layers per stage, e.g. 8,8,7,7 (per virtual stage with virtual stages; default: even)",
    )  # fmt: skip
    g.add_argument(
        "--virtual-pipeline-model-parallel-size", type=positive_int, default=1,
        help="model chunks per pipeline stage: the interleaved 1F1B schedule, whose bubble is 1/N of 1F1B's "
        "(default 1: 1F1B)",
    )  # fmt: skip
    g.add_argument("--decoder-first-pipeline-num-layers", type=positive_int, help="layers of the first stage")
    g.add_argument("--decoder-last-pipeline-num-layers", type=positive_int, help="layers of the last stage")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], help="default: nccl with CUDA, else gloo")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--save-interval", type=positive_int, help="iterations between checkpoints (default: at the end)")
    g.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints kept in --save")
    g.add_argument("--load", help="resume from this checkpoint directory (its 'latest')")
    g.add_argument(
        "--universal-checkpoint",
        action="store_true",
        help="--load is a universal checkpoint (tools/convert_checkpoint.py universal): resume at any TP x PP x "
        "DP layout and ZeRO stage 1-2",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a --save (or --log-dir) that holds another run's checkpoints (or metrics); "
        "checkpoints of the same iteration and final_model are replaced, the old run's others are kept",
    )
    g.add_argument(
        "--override-checkpoint-args",
        action="store_true",
        help="resume although settings that shape the data order or the objective differ from the checkpoint's "
        "(the differences are logged)",
    )
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=positive_int, default=10)
    g.add_argument("--eval-interval", type=positive_int, default=100)
    g.add_argument("--eval-iters", type=nonnegative_int, default=10)
    g.add_argument("--log-dir", help="metrics.jsonl, TensorBoard and plots (default: --save, else ./runs/latest)")
    g = p.add_argument_group("deepspeed")
    g.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", required=True, help="DeepSpeed JSON config")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The flags as a validated ``TrainConfig``; raises ArgumentError naming the flag."""
    return TrainConfig.from_flat(vars(build_parser().parse_args(argv))).validate()
