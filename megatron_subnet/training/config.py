"""The trainer's configuration: small typed sections built from pretrain_slm.py's flags, checked in one place.

Every field keeps its flag's name (``--tensor-model-parallel-size`` is ``parallel.tensor_model_parallel_size``),
so ``TrainConfig.flat()`` is the flag dictionary a checkpoint records and a resume compares. ``validate()``
holds every check across flags, one line each naming the flags; ``check_layout`` the few that need the
launched job (its data-parallel size and ZeRO stage); ``reconcile_ds_config`` fills the ds_config's
batch, clipping and precision keys from the flags (a disagreement is an error naming both).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields

from megatron_subnet.cli import ArgumentError
from megatron_subnet.parallel.losses import KD_LOSSES, KD_TEMPERATURE_RANGE
from megatron_subnet.training.checkpoint import UNIVERSAL_ZERO_STAGES
from megatron_subnet.training.ds_config import check_ds_config, load_ds_config

__all__ = ["ArgumentError", "BatchPlan", "TrainConfig", "check_layout", "reconcile_ds_config"]


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1
    pipeline_layer_split: list[int] | None = None
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    distributed_backend: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """Where the student comes from: cut from the parent (``init`` subnet) or random of a shape."""

    init: str = "subnet"
    parent_load: str | None = None
    subnet: str | None = None
    importance: str | None = None
    model_config: str | None = None


@dataclass(frozen=True)
class DistillConfig:
    teacher_load: str | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0
    kd_loss: str = KD_LOSSES[0]
    kd_topk: int = 64
    teacher_dtype: str | None = None  # validate(): the student's precision when not given


@dataclass(frozen=True)
class DataConfig:
    data_path: list[str] = dataclasses.field(default_factory=list)
    split: str = "949,50,1"
    seq_length: int = 512
    data_cache_path: str | None = None
    extra_valid_data_path: str | None = None
    seed: int = 1234


@dataclass(frozen=True)
class BatchConfig:
    micro_batch_size: int = 1
    global_batch_size: int | None = None


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, the learning-rate schedule and the run's length."""

    train_iters: int | None = None
    train_tokens: int | None = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_wsd_decay_iters: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    max_skipped_steps: int = 10


@dataclass(frozen=True)
class PrecisionConfig:
    bf16: bool = False
    recompute_activations: bool = False
    recompute_granularity: str | None = None
    compile: bool = False
    peak_tflops: float | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    save_interval: int | None = None
    keep_last: int = 2
    load: str | None = None
    universal_checkpoint: bool = False
    overwrite: bool = False
    override_checkpoint_args: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    log_dir: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    ds_config: str
    parallel: ParallelConfig = ParallelConfig()
    model: ModelSource = ModelSource()
    distill: DistillConfig = DistillConfig()
    data: DataConfig = DataConfig()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    precision: PrecisionConfig = PrecisionConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    local_rank: int | None = None  # set by the deepspeed launcher; unused (LOCAL_RANK is read)

    @classmethod
    def from_flat(cls, flat: dict) -> TrainConfig:
        """The config of a flag dictionary (``flat()``'s form); an unknown key is an error."""
        kwargs, used = {}, set()
        for f in fields(cls):
            if dataclasses.is_dataclass(f.default):
                section = type(f.default)
                values = {s.name: flat[s.name] for s in fields(section) if s.name in flat}
                kwargs[f.name], used = section(**values), used | set(values)
            elif f.name in flat:
                kwargs[f.name] = flat[f.name]
                used.add(f.name)
        unknown = sorted(set(flat) - used)
        if unknown:
            raise ArgumentError(f"unknown settings: {', '.join(unknown)}")
        return cls(**kwargs)

    def flat(self) -> dict:
        """Every setting by its flag's name: what a checkpoint records and a resume compares."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out.update(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {f.name: value})
        return out

    def replace(self, section: str, **changes) -> TrainConfig:
        """A copy with ``changes`` in one section (``config.replace("model", parent_load=...)``)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def validate(self) -> TrainConfig:
        """Every check across flags (one flag's range is the parser's), the first failing one raised as an
        ``ArgumentError``; returns the config with the implied settings filled in."""
        _check_parallel(self.parallel)
        _check_length(self.optim)
        _check_temperature(self.distill)
        _check_optimizer(self.optim)
        config = _implied(self)
        _check_schedule(self.optim)
        _check_student(self.model, self.distill, self.checkpoint)
        _check_teacher(self.distill, self.model)
        _check_resume(self.checkpoint)
        _check_paths(self)
        check_ds_config(load_ds_config(self.ds_config), self.ds_config)
        return config


def _implied(config: TrainConfig) -> TrainConfig:
    """``--recompute-activations`` is ``--recompute-granularity selective``; the teacher's dtype is the
    student's unless given."""
    precision = config.precision
    if precision.recompute_activations and precision.recompute_granularity not in (None, "selective"):
        raise ArgumentError(
            f"--recompute-activations means --recompute-granularity selective; got --recompute-granularity "
            f"{precision.recompute_granularity}: give one of the two"
        )
    if precision.recompute_activations:
        config = config.replace("precision", recompute_granularity="selective")
    if config.distill.teacher_dtype is None:
        config = config.replace("distill", teacher_dtype="bf16" if precision.bf16 else "fp32")
    return config


def _check_parallel(p: ParallelConfig) -> None:
    pp, chunks = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if p.pipeline_layer_split and (p.decoder_first_pipeline_num_layers or p.decoder_last_pipeline_num_layers):
        raise ArgumentError("--pipeline-layer-split: give it or --decoder-first/last-pipeline-num-layers, not both")
    if chunks > 1 and pp == 1:
        raise ArgumentError(
            f"--virtual-pipeline-model-parallel-size {chunks}: needs --pipeline-model-parallel-size >= 2"
        )
    if p.pipeline_layer_split and len(p.pipeline_layer_split) != pp * chunks:
        virtual = f" x --virtual-pipeline-model-parallel-size {chunks}" if chunks > 1 else ""
        raise ArgumentError(
            f"--pipeline-layer-split {','.join(map(str, p.pipeline_layer_split))}: {len(p.pipeline_layer_split)} "
            f"counts for --pipeline-model-parallel-size {pp}{virtual}"
        )


def _check_length(o: OptimConfig) -> None:
    if (o.train_iters is None) == (o.train_tokens is None):
        raise ArgumentError("give exactly one of --train-iters and --train-tokens")


def _check_temperature(d: DistillConfig) -> None:
    low, high = KD_TEMPERATURE_RANGE
    if not low <= d.kd_temperature <= high:
        raise ArgumentError(
            f"--kd-temperature {d.kd_temperature}: must lie in [{low}, {high}] (the paper's recipe uses 10; beyond "
            "the range the loss overflows or distillation contributes nothing)"
        )


def _check_optimizer(o: OptimConfig) -> None:
    if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ArgumentError(f"--lr {o.lr} / --min-lr {o.min_lr}: need 0 <= min-lr <= lr")
    for flag, value in (("--adam-beta1", o.adam_beta1), ("--adam-beta2", o.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ArgumentError(f"{flag} {value}: must be in [0, 1)")
    if o.adam_eps <= 0:
        raise ArgumentError(f"--adam-eps {o.adam_eps}: must be positive")
    for flag, value in (("--weight-decay", o.weight_decay), ("--clip-grad", o.clip_grad)):
        if value < 0:
            raise ArgumentError(f"{flag} {value}: must be >= 0")


def _check_schedule(o: OptimConfig) -> None:
    if o.lr_decay_style == "wsd" and not o.lr_wsd_decay_iters:
        raise ArgumentError("--lr-decay-style wsd needs --lr-wsd-decay-iters")
    if o.train_iters is not None and o.lr_warmup_iters > o.train_iters:
        raise ArgumentError(f"--lr-warmup-iters {o.lr_warmup_iters}: more than --train-iters {o.train_iters}")


def _check_student(m: ModelSource, d: DistillConfig, c: CheckpointConfig) -> None:
    if c.load is not None:
        return  # resuming: the checkpoint's student (and its parent: preflight.resolve_parent)
    parent = m.parent_load or d.teacher_load  # the parent defaults to the teacher
    if m.init == "subnet" and not (parent and m.subnet):
        raise ArgumentError("--init subnet needs --teacher-load (or --parent-load) and --subnet")
    if m.init == "random" and not (m.model_config or (parent and m.subnet)):
        raise ArgumentError(
            "--init random needs --model-config, or --teacher-load (or --parent-load) and --subnet for the shape"
        )


def _check_teacher(d: DistillConfig, m: ModelSource) -> None:
    if d.kd_alpha > 0 and not d.teacher_load:
        parent_only = "; --parent-load is the student's parent, not a teacher" if m.parent_load else ""
        raise ArgumentError(
            f"--kd-alpha {d.kd_alpha} needs a teacher (--teacher-load{parent_only}); use --kd-alpha 0 without one"
        )


def _check_resume(c: CheckpointConfig) -> None:
    if c.universal_checkpoint and c.load is None:
        raise ArgumentError("--universal-checkpoint: needs --load (the universal checkpoint to resume from)")


def _check_paths(config: TrainConfig) -> None:
    flat = config.flat()
    for key in ("parent_load", "teacher_load", "subnet", "importance", "model_config", "load", "ds_config"):
        path = flat[key]
        if path is not None and not os.path.exists(path):
            raise ArgumentError(f"--{key.replace('_', '-') if key != 'ds_config' else key} {path}: no such file")
    extra = config.data.extra_valid_data_path
    if extra is not None:
        from megatron_subnet.data.indexed import dataset_exists

        if not dataset_exists(extra):
            raise ArgumentError(f"--extra-valid-data-path {extra}: no such file {extra}.bin/.idx")
        if config.logging.eval_iters == 0:
            raise ArgumentError("--extra-valid-data-path: needs --eval-iters > 0 (no evaluation runs at 0)")


def check_layout(config: TrainConfig, accumulation: int, dp_size: int, zero_stage: int) -> None:
    """The checks across flags that need the launched job: its data-parallel size and the ds_config's ZeRO
    stage."""
    pp, chunks = config.parallel.pipeline_model_parallel_size, config.parallel.virtual_pipeline_model_parallel_size
    if chunks > 1 and accumulation % pp:
        raise ArgumentError(
            f"--virtual-pipeline-model-parallel-size {chunks}: the {accumulation} micro-batches of a step "
            f"(--global-batch-size / (--micro-batch-size x data-parallel size {dp_size})) are not a multiple of "
            f"--pipeline-model-parallel-size {pp}"
        )
    if config.precision.compile and zero_stage == 3:
        raise ArgumentError(
            "--compile: not supported with ZeRO stage 3 (its parameter partitioning hooks run outside the "
            "compiled graph); use ZeRO stage 0-2, or leave out --compile"
        )
    if config.checkpoint.universal_checkpoint and zero_stage not in UNIVERSAL_ZERO_STAGES:
        raise ArgumentError(
            f"--universal-checkpoint: needs ZeRO stage 1 or 2, this run's ds_config has ZeRO stage {zero_stage} "
            "(DeepSpeed loads universal checkpoints into the ZeRO-1/2 optimizer's partitions; stage 0 keeps none, "
            "and loading at stage 3 is not tested here)"
        )
    if pp > 1 and zero_stage > 1:
        raise ArgumentError(
            f"--pipeline-model-parallel-size {pp}: needs ZeRO stage 0 or 1, this run's ds_config has ZeRO stage "
            f"{zero_stage} (as DeepSpeed's own pipeline engine: ZeRO-2/3 partition and reduce gradients during "
            "the backward pass, which conflicts with the pipeline's reduction after the last micro-batch)"
        )


def _universal_loading(run: TrainConfig, checkpoint: object, where: str) -> dict:
    """The ds_config's ``checkpoint`` section with ``load_universal`` as --universal-checkpoint says."""
    flag = run.checkpoint.universal_checkpoint
    if not isinstance(checkpoint, dict):
        raise ArgumentError(f"{where}: 'checkpoint' must be an object, got {type(checkpoint).__name__}")
    ds_universal = checkpoint.get("load_universal", flag)
    if ds_universal != flag:
        raise ArgumentError(
            f"{where}: checkpoint.load_universal is {ds_universal} but --universal-checkpoint is "
            f"{'' if flag else 'not '}set"
        )
    return {**checkpoint, "load_universal": flag}


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of a run, resolved from the flags and the ds_config."""

    micro_batch_size: int
    global_batch_size: int
    gradient_accumulation_steps: int
    train_iters: int


def reconcile_ds_config(run: TrainConfig, config: dict, dp_size: int) -> tuple[dict, BatchPlan]:
    """The ds_config with its batch, clipping and precision keys filled from the flags (disagreement is an
    error), and the resolved batch plan: ``global batch = micro * accumulation * data-parallel size``."""
    config = dict(config)
    where = f"--ds_config {run.ds_config}"
    check_ds_config(config, run.ds_config)
    micro, bf16, clip = run.batch.micro_batch_size, run.precision.bf16, run.optim.clip_grad
    ds_micro = config.get("train_micro_batch_size_per_gpu", micro)
    if ds_micro != micro:
        raise ArgumentError(f"{where}: train_micro_batch_size_per_gpu {ds_micro} != --micro-batch-size {micro}")
    global_batch = run.batch.global_batch_size
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
    ds_clip = config.get("gradient_clipping", clip)
    if not math.isclose(ds_clip, clip):
        raise ArgumentError(f"{where}: gradient_clipping {ds_clip} != --clip-grad {clip}")
    ds_bf16 = bool(config.get("bf16", {}).get("enabled", bf16))
    if ds_bf16 != bf16:
        raise ArgumentError(f"{where}: bf16.enabled is {ds_bf16} but --bf16 is {'' if bf16 else 'not '}set")
    config.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=clip,
        bf16={**config.get("bf16", {}), "enabled": bf16},
    )
    config["checkpoint"] = _universal_loading(run, config.get("checkpoint", {}), where)
    config.setdefault("steps_per_print", 10**9)  # we log ourselves
    config["zero_allow_untested_optimizer"] = True  # our AdamW subclass only adds a NaN/Inf guard
    optim = run.optim
    train_iters = optim.train_iters or math.ceil(optim.train_tokens / (global_batch * run.data.seq_length))
    return config, BatchPlan(micro, global_batch, accumulation, train_iters)
