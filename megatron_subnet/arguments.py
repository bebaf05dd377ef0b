"""Command-line flags of pretrain_slm.py: Megatron-LM names where Megatron has the flag, one clear error each."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

from megatron_subnet.cli import ArgumentParser, finite_float, fraction, nonnegative_int, positive_float, positive_int
from megatron_subnet.parallel.losses import KD_LOSSES, KD_TEMPERATURE_RANGE


class ArgumentError(ValueError):
    """A flag (or ds_config key) with a bad value; the message names it."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; raises ArgumentError naming the flag."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Checks across flags (single-flag ranges are the argparse types'); ds_config is read and checked too."""
    pp, chunks = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
    if args.pipeline_layer_split and (args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers):
        raise ArgumentError("--pipeline-layer-split: give it or --decoder-first/last-pipeline-num-layers, not both")
    if chunks > 1 and pp == 1:
        raise ArgumentError(
            f"--virtual-pipeline-model-parallel-size {chunks}: needs --pipeline-model-parallel-size >= 2"
        )
    if args.pipeline_layer_split and len(args.pipeline_layer_split) != pp * chunks:
        virtual = f" x --virtual-pipeline-model-parallel-size {chunks}" if chunks > 1 else ""
        raise ArgumentError(
            f"--pipeline-layer-split {','.join(map(str, args.pipeline_layer_split))}: {len(args.pipeline_layer_split)} "
            f"counts for --pipeline-model-parallel-size {pp}{virtual}"
        )
    if (args.train_iters is None) == (args.train_tokens is None):
        raise ArgumentError("give exactly one of --train-iters and --train-tokens")
    low, high = KD_TEMPERATURE_RANGE
    if not low <= args.kd_temperature <= high:
        raise ArgumentError(
            f"--kd-temperature {args.kd_temperature}: must lie in [{low}, {high}] (the paper's recipe uses 10; beyond "
            "the range the loss overflows or distillation contributes nothing)"
        )
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ArgumentError(f"--lr {args.lr} / --min-lr {args.min_lr}: need 0 <= min-lr <= lr")
    for flag, value in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ArgumentError(f"{flag} {value}: must be in [0, 1)")
    if args.adam_eps <= 0:
        raise ArgumentError(f"--adam-eps {args.adam_eps}: must be positive")
    for flag, value in (("--weight-decay", args.weight_decay), ("--clip-grad", args.clip_grad)):
        if value < 0:
            raise ArgumentError(f"{flag} {value}: must be >= 0")
    if args.recompute_activations and args.recompute_granularity not in (None, "selective"):
        raise ArgumentError(
            f"--recompute-activations means --recompute-granularity selective; got --recompute-granularity "
            f"{args.recompute_granularity}: give one of the two"
        )
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.teacher_dtype is None:
        args.teacher_dtype = "bf16" if args.bf16 else "fp32"
    if args.lr_decay_style == "wsd" and not args.lr_wsd_decay_iters:
        raise ArgumentError("--lr-decay-style wsd needs --lr-wsd-decay-iters")
    if args.train_iters is not None and args.lr_warmup_iters > args.train_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters}: more than --train-iters {args.train_iters}")
    if args.load is None:
        # the parent defaults to the teacher (resuming, to the checkpoint's parent: training/trainer.py)
        parent = args.parent_load or args.teacher_load
        if args.init == "subnet" and not (parent and args.subnet):
            raise ArgumentError("--init subnet needs --teacher-load (or --parent-load) and --subnet")
        if args.init == "random" and not (args.model_config or (parent and args.subnet)):
            raise ArgumentError(
                "--init random needs --model-config, or --teacher-load (or --parent-load) and --subnet for the shape"
            )
    if args.kd_alpha > 0 and not args.teacher_load:
        parent_only = "; --parent-load is the student's parent, not a teacher" if args.parent_load else ""
        raise ArgumentError(
            f"--kd-alpha {args.kd_alpha} needs a teacher (--teacher-load{parent_only}); use --kd-alpha 0 without one"
        )
    for flag in ("parent_load", "teacher_load", "subnet", "importance", "model_config", "load", "ds_config"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise ArgumentError(f"--{flag.replace('_', '-') if flag != 'ds_config' else flag} {path}: no such file")
    if args.extra_valid_data_path is not None:
        from megatron_subnet.data.indexed import dataset_exists

        if not dataset_exists(args.extra_valid_data_path):
            prefix = args.extra_valid_data_path
            raise ArgumentError(f"--extra-valid-data-path {prefix}: no such file {prefix}.bin/.idx")
        if args.eval_iters == 0:
            raise ArgumentError("--extra-valid-data-path: needs --eval-iters > 0 (no evaluation runs at 0)")
    check_ds_config(load_ds_config(args.ds_config), args.ds_config)


def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArgumentError(f"--ds_config {path}: cannot read JSON ({e})") from None
    if not isinstance(config, dict):
        raise ArgumentError(f"--ds_config {path}: expected a JSON object")
    return config


_DS_INTEGERS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print")


def check_ds_config(config: dict, path: str) -> None:
    """ArgumentError naming the key when a ds_config value has the wrong type or range (before any work).

    The ``zero_optimization`` section is checked by DeepSpeed's own config model.
    """
    where = f"--ds_config {path}"
    if "optimizer" in config or "scheduler" in config:
        raise ArgumentError(
            f"{where}: remove 'optimizer'/'scheduler'; they come from --lr, --weight-decay, "
            "--adam-*, --lr-decay-style (Megatron's flags)"
        )
    for key in _DS_INTEGERS:
        value = config.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ArgumentError(f"{where}: {key} must be a positive integer, got {value!r}")
    clip = config.get("gradient_clipping")
    if clip is not None and (type(clip) not in (int, float) or not math.isfinite(clip) or clip < 0):
        raise ArgumentError(f"{where}: gradient_clipping must be a finite number >= 0, got {clip!r}")
    for key in ("bf16", "fp16"):
        section = config.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ArgumentError(f"{where}: {key} must be an object like {{\"enabled\": true}}, got {section!r}")
        if "enabled" in section and not isinstance(section["enabled"], bool):
            raise ArgumentError(f"{where}: {key}.enabled must be true or false, got {section['enabled']!r}")
    if config.get("fp16", {}).get("enabled"):
        raise ArgumentError(f"{where}: fp16 is not supported; use bf16")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ArgumentError(f"{where}: zero_optimization must be an object, got {zero!r}")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(k) for k in first["loc"])
        raise ArgumentError(
            f"{where}: zero_optimization.{key}: {first['msg']} (got {first.get('input')!r})"
        ) from None


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of a run, resolved from the flags and the ds_config."""

    micro_batch_size: int
    global_batch_size: int
    gradient_accumulation_steps: int
    train_iters: int


def reconcile_ds_config(args: argparse.Namespace, config: dict, dp_size: int) -> tuple[dict, BatchPlan]:
    """The ds_config with its batch, clipping and precision keys filled from the flags (disagreement is an
    error), and the resolved batch plan: ``global batch = micro * accumulation * data-parallel size``."""
    config = dict(config)
    where = f"--ds_config {args.ds_config}"
    check_ds_config(config, args.ds_config)
    micro = args.micro_batch_size
    ds_micro = config.get("train_micro_batch_size_per_gpu", micro)
    if ds_micro != micro:
        raise ArgumentError(f"{where}: train_micro_batch_size_per_gpu {ds_micro} != --micro-batch-size {micro}")
    global_batch = args.global_batch_size
    ds_global = config.get("train_batch_size")
    if global_batch is None:
        global_batch = (
            ds_global if ds_global is not None else micro * dp_size * config.get("gradient_accumulation_steps", 1)
        )
    if ds_global is not None and ds_global != global_batch:
        raise ArgumentError(f"{where}: train_batch_size {ds_global} != --global-batch-size {global_batch}")
    if global_batch % (micro * dp_size):
        raise ArgumentError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size {micro} x "
            f"data-parallel size {dp_size}"
        )
    accumulation = global_batch // (micro * dp_size)
    ds_accumulation = config.get("gradient_accumulation_steps", accumulation)
    if ds_accumulation != accumulation:
        raise ArgumentError(
            f"{where}: gradient_accumulation_steps {ds_accumulation} != {accumulation} = --global-batch-size "
            f"{global_batch} / (--micro-batch-size {micro} x data-parallel size {dp_size})"
        )
    ds_clip = config.get("gradient_clipping", args.clip_grad)
    if not math.isclose(ds_clip, args.clip_grad):
        raise ArgumentError(f"{where}: gradient_clipping {ds_clip} != --clip-grad {args.clip_grad}")
    ds_bf16 = bool(config.get("bf16", {}).get("enabled", args.bf16))
    if ds_bf16 != args.bf16:
        raise ArgumentError(f"{where}: bf16.enabled is {ds_bf16} but --bf16 is {'' if args.bf16 else 'not '}set")
    config.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=args.clip_grad,
        bf16={**config.get("bf16", {}), "enabled": args.bf16},
    )
    config.setdefault("steps_per_print", 10**9)  # we log ourselves
    config["zero_allow_untested_optimizer"] = True  # our AdamW subclass only adds a NaN/Inf guard
    train_iters = args.train_iters or math.ceil(args.train_tokens / (global_batch * args.seq_length))
    return config, BatchPlan(micro, global_batch, accumulation, train_iters)
