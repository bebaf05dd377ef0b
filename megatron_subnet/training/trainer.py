"""The pretraining run: ``Trainer(config).run()`` builds student, teacher and data, then iterates, logs,
evaluates and checkpoints. ``Callback``s observe the run (setup done, step start and end, evaluation,
checkpoint saved) without changing it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_subnet import initialize
from megatron_subnet.cli import same_on_every_rank
from megatron_subnet.data.batches import check_token_ids
from megatron_subnet.data.gpt_dataset import DATA_ORDER, PretrainingSampler, build_train_valid_test_datasets
from megatron_subnet.model.compile import compile_model
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.extract import extract_shard
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import CheckpointReader, check_finite, load_config, load_model, model_from_state
from megatron_subnet.model.weights import save_checkpoint as save_model_checkpoint
from megatron_subnet.parallel import state
from megatron_subnet.parallel.layers import TPShard
from megatron_subnet.parallel.pipeline import PipelineStage, current_stage, sync_tied_embedding
from megatron_subnet.training import checkpoint, preflight
from megatron_subnet.training.config import TrainConfig, check_layout, reconcile_ds_config
from megatron_subnet.training.ds_config import load_ds_config
from megatron_subnet.training.engine import (
    KDConfig,
    StepResult,
    Teacher,
    build_optimizer,
    evaluate,
    initialize_student,
    train_step,
)
from megatron_subnet.training.metrics import MetricsLogger, peak_memory_mb
from megatron_subnet.training.mfu import DTYPES, FlopsMeter
from megatron_subnet.training.peak import cpu_bf16_report
from megatron_subnet.training.schedules import LRSchedule
from megatron_subnet.training.universal import checkpoint_info


class TrainingAborted(RuntimeError):
    """A run that cannot produce anything useful: too many non-finite steps in a row, every step skipped, or a
    non-finite final evaluation."""

    same_on_every_rank = True  # skip decisions and evaluations are taken collectively


class Callback:
    """Observes a run; every hook does nothing unless overridden. ``trainer`` exposes the run (``engine``,
    ``student``, ``teacher``, ``progress``); a hook that changes them changes the run."""

    def on_setup_end(self, trainer: Trainer) -> None:
        """Models, engine (resumed when --load), data and logger are built; no step has run."""

    def on_step_start(self, trainer: Trainer, iteration: int, micro_batches: list[torch.Tensor]) -> None:
        """Step ``iteration`` (1-based) is about to run on this rank's ``micro_batches``."""

    def on_step_end(self, trainer: Trainer, iteration: int, result: StepResult) -> None:
        """Step ``iteration`` ran (applied, or skipped as non-finite: ``result.skipped``)."""

    def on_evaluation(self, trainer: Trainer, record: dict) -> None:
        """An evaluation's record (``valid_loss``, and ``extra_valid_loss`` with a second held-out text)."""

    def on_checkpoint_saved(self, trainer: Trainer, iteration: int, path: Path) -> None:
        """Every rank's part of the checkpoint of ``iteration`` is published at ``path``."""


@dataclass
class Progress:
    """Where a run stands; counts of this launch are apart from the run's history (``applied_before``)."""

    iteration: int = 0
    consumed: int = 0  # samples, over every data-parallel rank
    applied_before: int = 0  # steps whose update was applied before this launch
    steps_run: int = 0
    steps_applied: int = 0
    skipped_in_a_row: int = 0
    last_saved: Path | None = None
    last_good: Path | None = None  # the last checkpoint that holds a trained model
    last_valid: float | None = None
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0


def micro_batches(dataset, sampler: PretrainingSampler) -> Iterator[torch.Tensor]:
    for indices in sampler:
        yield torch.from_numpy(np.stack([dataset[i]["tokens"] for i in indices]))


def fixed_batches(dataset, count: int, micro: int, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """This rank's share of the first ``count`` global batches of an evaluation split."""
    if dataset is None or count == 0:
        return []
    total = min(len(dataset), count * micro * dp_size)
    return list(micro_batches(dataset, PretrainingSampler(total, 0, micro, dp_rank, dp_size)))


def build_student(
    config: TrainConfig, student: ModelConfig, subnet: SubnetConfig | None, resuming: bool, stage: PipelineStage,
    device: str,
) -> GPTModel:  # fmt: skip
    """This rank's tensor-parallel shard of its pipeline stage of the student, on ``device``: cut from the
    parent's checkpoint (only the rows and columns of the shard are read), Megatron's random init, or
    (resuming) to be overwritten by --load."""
    shard, parent, teacher = TPShard.current(), config.model.parent_load, config.distill.teacher_load
    if config.model.init == "subnet" and not resuming:
        # the flag that named the parent: --teacher-load when the parent is the teacher (the default)
        flag = "--teacher-load" if teacher is not None and preflight.same_path(parent, teacher) else "--parent-load"
        with CheckpointReader(parent) as reader:

            def read(name: str, rows, cols) -> torch.Tensor:
                return check_finite(name, reader.read(name, rows, cols), f"{flag} {parent}")

            _, weights = extract_shard(reader.config, read, subnet, shard, stage)
        model = model_from_state(student, weights, shard=shard, stage=stage).train().requires_grad_(True)
    else:
        model = GPTModel(student, shard, stage)
    model.to(device)  # before the sync: NCCL moves accelerator tensors only
    sync_tied_embedding(model)  # the last stage's copy of a tied embedding starts as the first stage's
    return model


def _parameters(config: ModelConfig | None) -> str:
    """``"N parameters (M non-embedding)"`` of a model, for the start-up line (``none``: no such model)."""
    if config is None:
        return "none"
    return f"{config.num_parameters():,} parameters ({config.num_parameters(False):,} non-embedding)"


class Trainer:
    """One pretraining run of ``config`` on this process's rank; ``run()`` returns the exit code."""

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = ()):
        self.config = config
        self.callbacks = list(callbacks)
        self.progress = Progress()
        self.teacher: Teacher | None = None
        self.teacher_config: ModelConfig | None = None

    def run(self) -> int:
        self.setup()
        try:
            for callback in self.callbacks:
                callback.on_setup_end(self)
            self._log_start()
            self.train()
            self.finish()
        except BaseException:
            self.logger.close(plot=False)  # ends the progress bar's line, so an error is a line of its own
            raise
        return 0

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything checkable from flags and JSON is checked before any weights or data are read."""
        self._start_job()
        self._check_resume()
        self._plan_models()
        self._build_models()
        self._build_data()
        self._build_engine()
        self._build_logging()

    def _start_job(self) -> None:
        """The process groups, the seed, the ds_config and batch plan, the checks that need the job."""
        c = self.config
        p = c.parallel
        self.device = initialize.initialize_distributed(
            p.distributed_backend, p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        )
        initialize.set_seed(c.data.seed)
        self.dp_rank, self.dp_size = state.get_data_parallel_rank(), state.get_data_parallel_world_size()
        self.ds_config, self.plan = reconcile_ds_config(c, load_ds_config(c.ds_config), self.dp_size)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        check_layout(c, self.plan.gradient_accumulation_steps, self.dp_size, self.zero_stage)
        self.layout = {
            "world_size": self.dp_size, "tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
            "zero_stage": self.zero_stage, "bf16": c.precision.bf16,
        }  # fmt: skip

    def _check_resume(self) -> None:
        """Resuming: the checkpoint's layout and settings against this launch's; the outputs; the run id."""
        c = self.config
        load = c.checkpoint.load
        self.resume_meta = checkpoint.read_meta(load) if load else None
        parent, parent_change = preflight.resolve_parent(c, self.resume_meta)
        self.config = c = c.replace("model", parent_load=parent)
        # the settings a resume compares: the flags as resolved (a ds_config's train_batch_size counts too)
        self.settings = {**c.flat(), "global_batch_size": self.plan.global_batch_size,
                         "train_iters": self.plan.train_iters, "data_order": DATA_ORDER}  # fmt: skip
        self.changes, self.extensions = [], []
        if self.resume_meta is not None:
            checkpoint.check_layout(self.resume_meta, self.layout, None, load, c.checkpoint.universal_checkpoint)
            self.changes, self.extensions = preflight.resume_changes(c, self.resume_meta, self.settings, parent_change)
        run_id = self.resume_meta.get("run_id") if self.resume_meta is not None else None
        self.log_dir = Path(c.logging.log_dir or c.checkpoint.save or "runs/latest")
        resumes_at = self.resume_meta["iteration"] if self.resume_meta is not None else None
        self.fresh_metrics = preflight.check_outputs(c, self.log_dir, run_id, resumes_at)
        self.run_id = state.broadcast_object(run_id or checkpoint.new_run_id())

    def _plan_models(self) -> None:
        """The student's and teacher's configs, checked against each other, the layout and the data."""
        c, meta = self.config, self.resume_meta
        # the parent: where the sub-network (and so the student's shape and weights) comes from; the teacher: who
        # distils (none at --kd-alpha 0). By default they are the same checkpoint.
        parent, teacher = c.model.parent_load, c.distill.teacher_load
        self.parent_config = load_config(parent) if parent else None
        if c.distill.kd_alpha > 0:
            same = parent is not None and preflight.same_path(parent, teacher)
            self.teacher_config = self.parent_config if same else load_config(teacher)
        self.student_config, self.subnet = preflight.plan_student(c, self.parent_config, meta)
        self.student_config.check_seq_length(c.data.seq_length)
        if self.teacher_config is not None:
            self.teacher_config.check_seq_length(c.data.seq_length)
            origin = (
                f"--load {c.checkpoint.load}" if meta is not None
                else f"--parent-load {parent}" if self.subnet is not None
                else f"--model-config {c.model.model_config}"
            )  # fmt: skip
            preflight.check_teacher_vocabulary(c, self.teacher_config, self.student_config, origin)
        self.layout["pipeline_layer_split"] = preflight.stage_split(c, "student", self.student_config)
        if self.teacher_config is not None:
            preflight.stage_split(c, "teacher", self.teacher_config)
        if meta is not None and not c.checkpoint.universal_checkpoint:
            checkpoint.check_layer_split(meta, self.layout["pipeline_layer_split"], c.checkpoint.load)
        check_token_ids(c.data.data_path, self.student_config.vocab_size)
        if c.data.extra_valid_data_path:
            check_token_ids([c.data.extra_valid_data_path], self.student_config.vocab_size, "--extra-valid-data-path")
        d = c.distill
        self.kd = KDConfig(d.kd_alpha, d.kd_loss, d.kd_temperature, d.kd_topk)

    def _build_models(self) -> None:
        """This rank's shards of its stages of the student and (distilling) the frozen teacher."""
        c, chunks = self.config, self.config.parallel.virtual_pipeline_model_parallel_size
        p = c.parallel
        stage = current_stage(
            self.student_config.num_layers, p.pipeline_layer_split, p.decoder_first_pipeline_num_layers,
            p.decoder_last_pipeline_num_layers, chunks,
        )  # fmt: skip
        resuming = self.resume_meta is not None
        self.student = build_student(c, self.student_config, self.subnet, resuming, stage, self.device)
        self.student.set_recompute(c.precision.recompute_granularity)
        if c.precision.compile:
            compile_model(self.student)
        if self.kd.alpha > 0:  # the teacher's layers split evenly over the (virtual) stages
            teacher_load = c.distill.teacher_load
            model = load_model(teacher_load, stage=current_stage(self.teacher_config.num_layers, chunks=chunks))
            for name, tensor in model.state_dict().items():
                check_finite(name, tensor, f"--teacher-load {teacher_load}")
            self.teacher = Teacher(model, self.ds_config, self.device, DTYPES[c.distill.teacher_dtype])
            if c.precision.compile:
                compile_model(self.teacher.module)

    def _build_data(self) -> None:
        """The train, validation and test splits (and the second held-out text), their indices built once."""
        c, global_batch, train_iters = self.config, self.plan.global_batch_size, self.plan.train_iters
        data, eval_iters = c.data, c.logging.eval_iters
        evals = train_iters // c.logging.eval_interval + 1
        num_samples = (train_iters * global_batch, evals * eval_iters * global_batch, eval_iters * global_batch)
        data_args = (data.data_path, data.split, data.seq_length, data.seed, num_samples, data.data_cache_path)
        # the second held-out text: every document of its prefix is a validation document
        extra = data.extra_valid_data_path
        extra_args = ([extra], "0,1,0", data.seq_length, data.seed, (0, eval_iters * global_batch, 0),
                      data.data_cache_path) if extra else None  # fmt: skip
        if state.get_rank() == 0:
            build_train_valid_test_datasets(*data_args)  # builds and caches the indices once
            if extra_args:
                build_train_valid_test_datasets(*extra_args)
        state.barrier()
        self.train_ds, valid_ds, self.test_ds = build_train_valid_test_datasets(*data_args)
        extra_valid_ds = build_train_valid_test_datasets(*extra_args)[1] if extra_args else None
        if self.train_ds is None:
            raise same_on_every_rank(ValueError(f"--split {data.split}: the train split is empty"))
        self.valid_ds, self.extra_valid_ds = valid_ds, extra_valid_ds

    def _fixed_batches(self, dataset) -> list[torch.Tensor]:
        micro = self.config.batch.micro_batch_size
        return fixed_batches(dataset, self.config.logging.eval_iters, micro, self.dp_rank, self.dp_size)

    def _build_engine(self) -> None:
        """The student's DeepSpeed engine and optimizer; resuming, their state and the run's progress."""
        o, load = self.config.optim, self.config.checkpoint.load
        # DeepSpeed writes the module's universal_checkpoint_info into every checkpoint (training/universal.py)
        self.student.universal_checkpoint_info = checkpoint_info(self.student_config)
        self.optimizer = build_optimizer(self.student, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), o.adam_eps)
        self.engine = initialize_student(self.student, self.optimizer, self.ds_config)
        if load:
            meta = checkpoint.load_checkpoint(self.engine, load)
            self.progress.iteration, self.progress.consumed = meta["iteration"], meta["consumed_samples"]
            # the steps whose update was applied, over the run's whole history (older checkpoints: every step)
            self.progress.applied_before = meta.get("steps_applied", meta["iteration"])
            if self.progress.applied_before:
                self.progress.last_good = checkpoint.latest_checkpoint(load)

    def _build_logging(self) -> None:
        """The learning-rate schedule, the metrics logger and (rank 0) the FLOPs meter."""
        c, train_iters = self.config, self.plan.train_iters
        o, precision = c.optim, c.precision
        self.schedule = LRSchedule(
            o.lr, o.min_lr, o.lr_warmup_iters, train_iters, o.lr_decay_style, o.lr_wsd_decay_iters or 0
        )
        rank0 = state.get_rank() == 0
        self.logger = MetricsLogger(self.log_dir, rank0, train_iters, self.progress.iteration, fresh=self.fresh_metrics)
        self.meter = None
        if rank0:  # only rank 0 logs; the peak is one device's
            self.meter = FlopsMeter.build(
                self.student_config, self.teacher_config if self.teacher is not None else None, c.data.seq_length,
                state.get_world_size(), torch.device(self.engine.device), self.student_dtype, c.distill.teacher_dtype,
                precision.recompute_granularity, precision.peak_tflops,
            )  # fmt: skip
        self.meta = {
            "args": {k: v for k, v in self.settings.items() if isinstance(v, str | int | float | bool | list | None)},
            "model_config": self.student.config.to_dict(),
            "subnet": self.subnet.to_dict() if self.subnet is not None else None,
            "layout": self.layout,
            "run_id": self.run_id,
            "universal_checkpoint_info": self.student.universal_checkpoint_info,
        }

    @property
    def student_dtype(self) -> str:
        return "bf16" if self.config.precision.bf16 else "fp32"

    def _log_start(self) -> None:
        """The start-up lines: resume changes, the models and layout, precision and FLOPs."""
        c, p = self.config, self.config.parallel
        for change in self.changes:
            self.logger.write(f"resuming with a changed setting (--override-checkpoint-args): {change}")
        for change in self.extensions:
            self.logger.write(f"resuming extends the run ({change}; every step taken keeps its learning rate and data)")
        pp, chunks = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
        teacher = self.teacher_config if self.teacher is not None else None
        self.logger.write(
            f"student: {_parameters(self.student.config)}; parent: {_parameters(self.parent_config)}; "
            f"teacher: {_parameters(teacher)}; tensor parallel {p.tensor_model_parallel_size}, pipeline parallel "
            f"{pp}{f' x {chunks} virtual (interleaved)' * (chunks > 1)}, data parallel {self.dp_size}, ZeRO stage "
            f"{self.zero_stage}, global batch {self.plan.global_batch_size} = {c.batch.micro_batch_size} x "
            f"{self.plan.gradient_accumulation_steps} x {self.dp_size}"
        )
        if self.meter is not None:
            self._log_precision()

    def _log_precision(self) -> None:
        c, meter, dtype = self.config, self.meter, self.student_dtype
        recompute, teacher_dtype = c.precision.recompute_granularity, c.distill.teacher_dtype
        self.logger.write(
            f"precision: student {dtype}{' (fp32 master weights and optimizer state)' * c.precision.bf16}, "
            f"teacher {teacher_dtype if self.teacher is not None else 'none'}; recompute "
            f"{recompute or 'off'}; compile {'on' if c.precision.compile else 'off'}"
        )
        self.logger.write(
            f"FLOPs per token: student training {meter.student_per_token:.4g} (3x forward"
            f"{'' if recompute is None else f'; {meter.hardware_per_token:.4g} with recompute'}), "
            f"teacher forward {meter.teacher_per_token:.4g}; peak per device {meter.student_peak / 1e12:.3g} "
            f"TFLOP/s ({meter.peak_source})"
        )
        if torch.device(self.engine.device).type == "cpu" and "bf16" in (dtype, teacher_dtype):
            report = cpu_bf16_report()
            if report:
                self.logger.write(report)

    # ------------------------------------------------------------------------------------------------- loop

    def train(self) -> None:
        """Steps until --train-iters, evaluating and saving on their intervals; where the student starts
        is evaluated first (the quality of the initialisation is what sub-network selection buys)."""
        p, micro = self.progress, self.config.batch.micro_batch_size
        accumulation = self.plan.gradient_accumulation_steps
        self.final: dict[str, float] = {}
        self.valid_batches = self._fixed_batches(self.valid_ds)
        self.extra_batches = self._fixed_batches(self.extra_valid_ds)
        sampler = PretrainingSampler(len(self.train_ds), p.consumed, micro, self.dp_rank, self.dp_size)
        batches = micro_batches(self.train_ds, sampler)
        if self.valid_batches and p.iteration == 0:
            self.evaluate(0, 0)
        p.window_start, p.window_steps = time.perf_counter(), 0
        while p.iteration < self.plan.train_iters:
            self.step([next(batches) for _ in range(accumulation)])
        self._check_trained()

    def step(self, batches: list[torch.Tensor]) -> StepResult:
        """One optimizer step on this rank's micro-batches, then its record, evaluation and checkpoint."""
        p, c = self.progress, self.config
        lr = self.schedule(p.iteration)
        for callback in self.callbacks:
            callback.on_step_start(self, p.iteration + 1, batches)
        result = train_step(self.engine, self.teacher, batches, lr, self.kd)
        p.iteration += 1
        p.consumed += self.plan.global_batch_size
        p.window_steps += 1
        p.steps_run += 1
        p.steps_applied += not result.skipped
        p.skipped_in_a_row = p.skipped_in_a_row + 1 if result.skipped else 0
        for callback in self.callbacks:
            callback.on_step_end(self, p.iteration, result)
        self._log_step(result, lr)
        if p.skipped_in_a_row >= c.optim.max_skipped_steps:  # after the step's record is in metrics.jsonl
            raise self._abort(
                f"--max-skipped-steps {c.optim.max_skipped_steps}: {p.skipped_in_a_row} non-finite steps in a row "
                f"at iteration {p.iteration}; last good checkpoint: {p.last_good or 'none'}"
            )
        self.logger.advance()
        last = p.iteration == self.plan.train_iters
        if self.valid_batches and (p.iteration % c.logging.eval_interval == 0 or last):
            p.last_valid = self.evaluate(p.iteration, p.consumed * c.data.seq_length)
        if c.checkpoint.save and c.checkpoint.save_interval and p.iteration % c.checkpoint.save_interval == 0:
            p.last_saved = self.save(p.iteration)
        return result

    def _log_step(self, result: StepResult, lr: float) -> None:
        """The step's record in metrics.jsonl, on --log-interval, at the last step and at a skipped step."""
        p, seq_length = self.progress, self.config.data.seq_length
        if result.skipped:
            self.logger.write(
                f"iteration {p.iteration}: non-finite loss or gradient (loss {result.loss}, grad norm "
                f"{result.grad_norm}); step skipped ({p.skipped_in_a_row} in a row)"
            )
        if not (p.iteration % self.config.logging.log_interval == 0 or p.iteration == self.plan.train_iters
                or result.skipped):  # fmt: skip
            return
        elapsed = time.perf_counter() - p.window_start
        tokens = p.window_steps * self.plan.global_batch_size * seq_length
        meter = self.meter
        self.logger.log({
            "iteration": p.iteration, "loss": result.loss, "ce": result.ce, "kd": result.kd, "lr": lr,
            "grad_norm": result.grad_norm, "skipped": result.skipped, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "tokens": p.consumed * seq_length, "peak_memory_mb": peak_memory_mb(),
            **(meter.rates(tokens, elapsed) if meter else {}),
            **(meter.totals(p.consumed * seq_length) if meter else {}),
        })  # fmt: skip
        p.window_start, p.window_steps = time.perf_counter(), 0

    def evaluate(self, iteration: int, tokens: int) -> float:
        """Score the validation batches (and the extra held-out text's); log them; the validation loss."""
        loss = evaluate(self.engine, self.valid_batches, self.engine.device)
        record = {"iteration": iteration, "tokens": tokens, "valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}
        if self.extra_batches:
            extra = evaluate(self.engine, self.extra_batches, self.engine.device)
            record.update(extra_valid_loss=extra, extra_valid_ppl=math.exp(min(extra, 50.0)))
            self.final["extra_validation"] = extra
        self.logger.log(record)
        for callback in self.callbacks:
            callback.on_evaluation(self, record)
        return loss

    def save(self, iteration: int) -> Path:
        """The checkpoint of ``iteration`` (collective); the last good one when the run has applied a step."""
        p, c = self.progress, self.config.checkpoint
        applied = p.applied_before + p.steps_applied
        meta = {**self.meta, "consumed_samples": p.consumed, "steps_applied": applied}
        path = checkpoint.save_checkpoint(self.engine, c.save, iteration, meta, c.keep_last)
        p.last_good = path if applied else p.last_good
        for callback in self.callbacks:
            callback.on_checkpoint_saved(self, iteration, path)
        return path

    def _abort(self, message: str) -> TrainingAborted:
        self.logger.close()  # with the plot of what was trained
        return TrainingAborted(message)

    def _check_trained(self) -> None:
        """A run (or the run a resume continues) whose every step was skipped trained nothing."""
        p = self.progress
        if p.steps_run and not p.steps_applied:
            raise self._abort(
                f"every one of this run's {p.steps_run} steps was skipped (non-finite loss or gradient); nothing was "
                f"trained, no final model written; last good checkpoint: {p.last_good or 'none'}"
            )
        if p.iteration and not p.applied_before + p.steps_applied:
            raise self._abort(
                f"--load {self.config.checkpoint.load}: every step of the run it continues was skipped (non-finite "
                "loss or gradient); nothing was trained, no final model written"
            )

    # ----------------------------------------------------------------------------------------------- finish

    def finish(self) -> None:
        """The last checkpoint, the test evaluation, and the final model (Hugging Face-ready) in --save."""
        p, save = self.progress, self.config.checkpoint.save
        if save and (p.last_saved is None or p.last_saved.name != checkpoint.tag_for(p.iteration)):
            p.last_saved = self.save(p.iteration)
        test_batches = self._fixed_batches(self.test_ds)
        if test_batches:
            self.final["test"] = evaluate(self.engine, test_batches, self.engine.device)
            test_ppl = math.exp(min(self.final["test"], 50.0))
            self.logger.log({"iteration": p.iteration, "test_loss": self.final["test"], "test_ppl": test_ppl})
        if p.last_valid is not None:
            self.final["validation"] = p.last_valid
        bad = [f"{name} loss {value}" for name, value in self.final.items() if not math.isfinite(value)]
        if bad:
            raise self._abort(f"the final {' and '.join(bad)}: the model is broken; no final model written")
        weights = checkpoint.consolidated_state_dict(self.engine, self.student.config) if save else None  # collective
        if save and state.get_rank() == 0:
            final_model = Path(save) / checkpoint.FINAL_MODEL
            subnet = self.subnet.to_dict() if self.subnet is not None else None
            # the student's vocabulary (and so its tokenizer) is the parent's
            save_model_checkpoint(final_model, self.student.config, weights, self.config.model.parent_load, subnet)
            self.logger.write(f"final model: {final_model} (tools/convert_checkpoint.py export)")
        state.barrier()
        self.logger.close()
