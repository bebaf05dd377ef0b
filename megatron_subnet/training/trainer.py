"""The pretraining run: build student, teacher and data, then iterate, log, evaluate and checkpoint."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megatron_subnet.arguments import load_ds_config, reconcile_ds_config
from megatron_subnet.cli import same_on_every_rank
from megatron_subnet.data.batches import check_token_ids
from megatron_subnet.data.gpt_dataset import DATA_ORDER, PretrainingSampler, build_train_valid_test_datasets
from megatron_subnet.initialize import initialize_distributed, set_seed
from megatron_subnet.model.compile import compile_model
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.extract import extract_shard
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.shapes import check_divisible
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import (
    CheckpointReader,
    check_finite,
    load_config,
    load_model,
    model_from_state,
)
from megatron_subnet.model.weights import save_checkpoint as save_model_checkpoint
from megatron_subnet.parallel import state
from megatron_subnet.parallel.layers import TPShard
from megatron_subnet.parallel.pipeline import PipelineStage, current_stage, split_layers
from megatron_subnet.training import checkpoint
from megatron_subnet.training.engine import (
    KDConfig,
    Teacher,
    build_optimizer,
    evaluate,
    initialize_student,
    sync_tied_embedding,
    train_step,
)
from megatron_subnet.training.metrics import MetricsLogger, peak_memory_mb
from megatron_subnet.training.mfu import DTYPES, FlopsMeter
from megatron_subnet.training.peak import cpu_bf16_report
from megatron_subnet.training.schedules import LRSchedule


class TrainingAborted(RuntimeError):
    """A run that cannot produce anything useful: too many non-finite steps in a row, every step skipped, or a
    non-finite final evaluation."""

    same_on_every_rank = True  # skip decisions and evaluations are taken collectively


def _load_importance(path: str | None):
    if path is None:
        return None
    from megatron_subnet.model.importance import load_importance

    return load_importance(path)


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _saved_parent(resume_meta: dict) -> str | None:
    """The parent a checkpoint's run was cut from; checkpoints from before --parent-load had the teacher."""
    saved = resume_meta.get("args", {})
    return saved["parent_load"] if "parent_load" in saved else saved.get("teacher_load")


def resolve_parent(args: argparse.Namespace, resume_meta: dict | None) -> tuple[str | None, str | None]:
    """The parent checkpoint of this run and, resuming, the change of parent this launch asks for (a
    ``"--parent-load: old -> new"`` like ``checkpoint.changed_args``'s, or None).

    The parent is --parent-load as given; without it, resuming, the checkpoint's parent (when it still
    exists); else --teacher-load."""
    saved = _saved_parent(resume_meta) if resume_meta is not None else None
    if args.parent_load is not None:
        change = None
        if saved is not None and not _same_path(saved, args.parent_load):
            change = f"--parent-load: {saved} -> {args.parent_load}"
        return args.parent_load, change
    if saved is not None and os.path.isdir(saved):
        return saved, None
    return args.teacher_load, None


def teacher_change(args: argparse.Namespace, resume_meta: dict | None) -> str | None:
    """Resuming a distillation run with another --teacher-load: ``"--teacher-load: old -> new"``, else None."""
    saved = (resume_meta or {}).get("args", {})
    old = saved.get("teacher_load")
    if args.kd_alpha == 0 or not saved.get("kd_alpha") or old is None or _same_path(old, args.teacher_load):
        return None
    return f"--teacher-load: {old} -> {args.teacher_load}"


def student_changes(args: argparse.Namespace, resume_meta: dict) -> list[str]:
    """Resuming: the flags that define the student (``--init``, ``--subnet``, ``--model-config``) where this
    launch's differ from the checkpoint's student, as ``"--flag: old -> new"`` (sub-networks and configs
    compared by content, not by path). The checkpoint's student is what a resume trains."""
    saved = resume_meta.get("args", {})
    changes = []
    if "init" in saved and saved["init"] != args.init:
        changes.append(f"--init: {saved['init']} -> {args.init}")
    if args.subnet and args.parent_load:
        subnet = SubnetConfig.load(args.subnet, load_config(args.parent_load), _load_importance(args.importance))
        old = resume_meta.get("subnet")
        if old is None or SubnetConfig(**old).to_dict() != subnet.to_dict():
            changes.append(f"--subnet: {saved.get('subnet')} -> {args.subnet} (another sub-network)")
    elif args.model_config and resume_meta.get("subnet") is None:
        if ModelConfig.load(args.model_config).to_dict() != resume_meta["model_config"]:
            changes.append(f"--model-config: {saved.get('model_config')} -> {args.model_config} (another student)")
    return changes


def plan_student(
    args: argparse.Namespace, parent_config: ModelConfig | None, resume_meta: dict | None
) -> tuple[ModelConfig, SubnetConfig | None]:
    """The student's architecture and the sub-network of the parent it is cut from (None for a random
    student without one), from the configs alone: nothing is loaded but JSON."""
    if resume_meta is not None:
        subnet = resume_meta.get("subnet")
        config = ModelConfig.from_dict(resume_meta["model_config"])
        return config, None if subnet is None else SubnetConfig(**subnet)
    subnet = None
    if args.subnet:
        subnet = SubnetConfig.load(args.subnet, parent_config, _load_importance(args.importance))
    if subnet is not None:
        return subnet.student_config(parent_config), subnet
    return ModelConfig.load(args.model_config), None


def build_student(
    args: argparse.Namespace,
    config: ModelConfig,
    subnet: SubnetConfig | None,
    resuming: bool,
    stage: PipelineStage,
    device: str,
) -> GPTModel:
    """This rank's tensor-parallel shard of its pipeline stage of the student, on ``device``: cut from the
    parent's checkpoint (only the rows and columns of the shard are read), Megatron's random init, or
    (resuming) to be overwritten by --load."""
    shard = TPShard.current()
    if args.init == "subnet" and not resuming:
        # the flag that named the parent: --teacher-load when the parent is the teacher (the default)
        same = args.teacher_load is not None and _same_path(args.parent_load, args.teacher_load)
        flag = "--teacher-load" if same else "--parent-load"
        with CheckpointReader(args.parent_load) as reader:

            def read(name: str, rows, cols) -> torch.Tensor:
                return check_finite(name, reader.read(name, rows, cols), f"{flag} {args.parent_load}")

            _, weights = extract_shard(reader.config, read, subnet, shard, stage)
        model = model_from_state(config, weights, shard=shard, stage=stage).train().requires_grad_(True)
    else:
        model = GPTModel(config, shard, stage)
    model.to(device)  # before the sync: NCCL moves accelerator tensors only
    sync_tied_embedding(model)  # the last stage's copy of a tied embedding starts as the first stage's
    return model


def _data_files(data_path: list[str]) -> list[str]:
    from megatron_subnet.data.gpt_dataset import parse_data_path
    from megatron_subnet.data.indexed import bin_path, idx_path

    return [f for _, prefix in parse_data_path(data_path) for f in (bin_path(prefix), idx_path(prefix))]


def check_outputs(args: argparse.Namespace, log_dir: Path, run_id: str | None, resuming: bool) -> bool:
    """Refuse, before any work, outputs this run may not write (see ``outputs.py``); returns whether the
    metrics file starts anew (a new run with --overwrite)."""
    from megatron_subnet.outputs import OutputError, check_not_nested, check_writable_location

    inputs = {
        "--teacher-load": args.teacher_load,
        # the parent (read again at the end, for the final model's tokenizer), named apart when it is not the teacher
        **({"--parent-load": args.parent_load} if args.parent_load != args.teacher_load else {}),
        "--subnet": args.subnet,
        "--importance": args.importance,
        "--model-config": args.model_config,
        "--ds_config": args.ds_config,
        **{f"--data-path ({Path(f).name})": f for f in _data_files(args.data_path)},
        **{f"--extra-valid-data-path ({Path(f).name})": f
           for f in (_data_files([args.extra_valid_data_path]) if args.extra_valid_data_path else [])},
    }
    rewritten = [log_dir / "metrics.jsonl", log_dir / "loss_curve.png", log_dir / "tensorboard"]
    if args.save:
        check_writable_location(args.save, "--save", "dir")
        checkpoint.check_save_dir(args.save, args.load, run_id, args.overwrite)
        rewritten.append(Path(args.save) / checkpoint.FINAL_MODEL)
        save = Path(args.save).resolve()
        for flag, path in inputs.items():
            resolved = Path(path).resolve() if path else None
            parts = resolved.relative_to(save).parts if resolved and resolved.is_relative_to(save) else ()
            if parts[:1] and parts[0].startswith("iter_"):
                raise OutputError(f"--save {args.save}: {flag} {path} lies in a checkpoint this run may replace")
    for output in rewritten:
        check_not_nested(output, "--save" if output.name == checkpoint.FINAL_MODEL else "--log-dir", inputs)
    check_writable_location(log_dir, "--log-dir", "dir")
    metrics = log_dir / "metrics.jsonl"
    if resuming or not metrics.exists():
        return False
    if args.overwrite:
        return True
    raise OutputError(
        f"--log-dir {log_dir}: holds another run's metrics.jsonl; choose a new --log-dir (or --save) or pass "
        "--overwrite to start it anew"
    )


def _parameters(config: ModelConfig | None) -> str:
    """``"N parameters (M non-embedding)"`` of a model, for the start-up line (``none``: no such model)."""
    if config is None:
        return "none"
    return f"{config.num_parameters():,} parameters ({config.num_parameters(False):,} non-embedding)"


def micro_batches(dataset, sampler: PretrainingSampler) -> Iterator[torch.Tensor]:
    for indices in sampler:
        yield torch.from_numpy(np.stack([dataset[i]["tokens"] for i in indices]))


def fixed_batches(dataset, count: int, micro: int, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """This rank's share of the first ``count`` global batches of an evaluation split."""
    if dataset is None or count == 0:
        return []
    total = min(len(dataset), count * micro * dp_size)
    return list(micro_batches(dataset, PretrainingSampler(total, 0, micro, dp_rank, dp_size)))


def pretrain(args: argparse.Namespace) -> int:
    device = initialize_distributed(
        args.distributed_backend, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    )
    set_seed(args.seed)
    dp_rank, dp_size = state.get_data_parallel_rank(), state.get_data_parallel_world_size()
    tp = state.get_tensor_model_parallel_world_size()
    ds_config, plan = reconcile_ds_config(args, load_ds_config(args.ds_config), dp_size)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    pp, chunks = state.get_pipeline_model_parallel_world_size(), args.virtual_pipeline_model_parallel_size
    layout = {"world_size": dp_size, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
              "virtual_pipeline_model_parallel_size": chunks, "zero_stage": zero_stage, "bf16": args.bf16}  # fmt: skip
    if chunks > 1:
        backend = torch.distributed.get_backend(state.get_pipeline_model_parallel_group())
        if backend != "gloo":
            raise same_on_every_rank(ValueError(
                f"--virtual-pipeline-model-parallel-size {chunks}: the interleaved schedule runs on gloo only for "
                f"now, this run's backend is {backend} (pass --distributed-backend gloo, or leave the flag out)"
            ))
        if plan.gradient_accumulation_steps % pp:
            raise same_on_every_rank(ValueError(
                f"--virtual-pipeline-model-parallel-size {chunks}: the {plan.gradient_accumulation_steps} "
                f"micro-batches of a step (--global-batch-size / (--micro-batch-size x data-parallel size "
                f"{dp_size})) are not a multiple of --pipeline-model-parallel-size {pp}"
            ))
    if args.compile and zero_stage == 3:
        raise same_on_every_rank(ValueError(
            "--compile: not supported with ZeRO stage 3 (its parameter partitioning hooks run outside the "
            "compiled graph); use ZeRO stage 0-2, or leave out --compile"
        ))
    if pp > 1 and (zero_stage > 1 or args.bf16):
        raise same_on_every_rank(ValueError(
            f"--pipeline-model-parallel-size {pp}: supported with ZeRO stage 0 or 1 in fp32 (ZeRO-2/3 reduce "
            f"gradients during the backward pass, before the pipeline's tied-embedding sum; bf16 keeps them in "
            f"its own buffer); this run has ZeRO stage {zero_stage}{' and --bf16' if args.bf16 else ''}"
        ))
    # Everything that can be checked from flags and JSON is checked before any weights or data are read.
    resume_meta = checkpoint.read_meta(args.load) if args.load else None
    args.parent_load, parent_change = resolve_parent(args, resume_meta)
    # the settings a resume compares: the flags as resolved (a ds_config's train_batch_size counts too)
    settings = {**vars(args), "global_batch_size": plan.global_batch_size, "train_iters": plan.train_iters,
                "data_order": DATA_ORDER}  # fmt: skip
    changes, extensions = [], []
    if resume_meta is not None:
        checkpoint.check_layout(resume_meta, layout, None, args.load)
        changes = checkpoint.changed_args(resume_meta, settings) + student_changes(args, resume_meta) + [
            change for change in (parent_change, teacher_change(args, resume_meta)) if change
        ]
        if changes and not args.override_checkpoint_args:
            raise checkpoint.ResumeError(
                f"--load {args.load}: this launch changes what the checkpoint was trained on ({'; '.join(changes)}); "
                "use the checkpoint's settings, or pass --override-checkpoint-args if you mean it"
            )
        if not changes:
            extensions = checkpoint.extended_args(resume_meta, settings)
    run_id = resume_meta.get("run_id") if resume_meta is not None else None
    log_dir = Path(args.log_dir or args.save or "runs/latest")
    fresh_metrics = check_outputs(args, log_dir, run_id, resume_meta is not None)
    run_id = state.broadcast_object(run_id or checkpoint.new_run_id())
    # the parent: where the sub-network (and so the student's shape and weights) comes from; the teacher: who
    # distils (none at --kd-alpha 0). By default they are the same checkpoint.
    parent_config = load_config(args.parent_load) if args.parent_load else None
    teacher_config = None
    if args.kd_alpha > 0:
        same = args.parent_load is not None and _same_path(args.parent_load, args.teacher_load)
        teacher_config = parent_config if same else load_config(args.teacher_load)
    student_config, subnet = plan_student(args, parent_config, resume_meta)
    student_config.check_seq_length(args.seq_length)
    models = [("student", student_config)]
    if teacher_config is not None:
        teacher_config.check_seq_length(args.seq_length)
        if teacher_config.vocab_size != student_config.vocab_size:
            origin = (
                f"--load {args.load}" if resume_meta is not None
                else f"--parent-load {args.parent_load}" if subnet is not None
                else f"--model-config {args.model_config}"
            )  # fmt: skip
            raise checkpoint.ResumeError(
                f"--teacher-load {args.teacher_load}: vocabulary {teacher_config.vocab_size} "
                f"differs from the student's {student_config.vocab_size} ({origin}); the teacher needs the "
                "student's vocabulary"
            )
        models.append(("teacher", teacher_config))
    for name, config in models:
        try:
            check_divisible(config, tp)
            split = args.pipeline_layer_split if name == "student" else None
            counts = split_layers(config.num_layers, pp, split, *(
                (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers)
                if name == "student" else (None, None)), chunks=chunks)  # fmt: skip
        except ValueError as e:
            raise same_on_every_rank(ValueError(f"the {name} cannot be split: {e}")) from None
        if name == "student":
            layout["pipeline_layer_split"] = counts  # the student's layers per (virtual) stage
    if resume_meta is not None:
        checkpoint.check_layer_split(resume_meta, layout["pipeline_layer_split"], args.load)
    check_token_ids(args.data_path, student_config.vocab_size)
    if args.extra_valid_data_path:
        check_token_ids([args.extra_valid_data_path], student_config.vocab_size, "--extra-valid-data-path")
    kd = KDConfig(args.kd_alpha, args.kd_loss, args.kd_temperature, args.kd_topk)

    student_stage = current_stage(
        student_config.num_layers, args.pipeline_layer_split, args.decoder_first_pipeline_num_layers,
        args.decoder_last_pipeline_num_layers, chunks,
    )  # fmt: skip
    student = build_student(args, student_config, subnet, resume_meta is not None, student_stage, device)
    student.set_recompute(args.recompute_granularity)
    if args.compile:
        compile_model(student)
    teacher = None
    if kd.alpha > 0:  # this rank's shard of its stage only: the teacher's layers split evenly over the (virtual) stages
        teacher_stage = current_stage(teacher_config.num_layers, chunks=chunks)
        teacher_model = load_model(args.teacher_load, stage=teacher_stage)
        for name, tensor in teacher_model.state_dict().items():
            check_finite(name, tensor, f"--teacher-load {args.teacher_load}")
        teacher = Teacher(teacher_model, ds_config, device, DTYPES[args.teacher_dtype])
        if args.compile:
            compile_model(teacher.module)

    global_batch, accumulation = plan.global_batch_size, plan.gradient_accumulation_steps
    train_iters = plan.train_iters
    evals = train_iters // args.eval_interval + 1
    num_samples = (
        train_iters * global_batch,
        evals * args.eval_iters * global_batch,
        args.eval_iters * global_batch,
    )
    data_args = (args.data_path, args.split, args.seq_length, args.seed, num_samples, args.data_cache_path)
    # the second held-out text: every document of its prefix is a validation document
    extra_args = (
        ([args.extra_valid_data_path], "0,1,0", args.seq_length, args.seed, (0, args.eval_iters * global_batch, 0),
         args.data_cache_path) if args.extra_valid_data_path else None
    )  # fmt: skip
    if state.get_rank() == 0:
        build_train_valid_test_datasets(*data_args)  # builds and caches the indices once
        if extra_args:
            build_train_valid_test_datasets(*extra_args)
    state.barrier()
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(*data_args)
    extra_valid_ds = build_train_valid_test_datasets(*extra_args)[1] if extra_args else None
    if train_ds is None:
        raise same_on_every_rank(ValueError(f"--split {args.split}: the train split is empty"))

    optimizer = build_optimizer(student, args.lr, args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_eps)
    engine = initialize_student(student, optimizer, ds_config)
    iteration, consumed, applied_before = 0, 0, 0
    if args.load:
        meta = checkpoint.load_checkpoint(engine, args.load)
        iteration, consumed = meta["iteration"], meta["consumed_samples"]
        # the steps whose update was applied, over the run's whole history (older checkpoints: every step)
        applied_before = meta.get("steps_applied", iteration)

    schedule = LRSchedule(
        args.lr, args.min_lr, args.lr_warmup_iters, train_iters, args.lr_decay_style, args.lr_wsd_decay_iters or 0
    )
    logger = MetricsLogger(log_dir, state.get_rank() == 0, train_iters, iteration, fresh=fresh_metrics)
    meter = None
    student_dtype, on_cpu = "bf16" if args.bf16 else "fp32", torch.device(engine.device).type == "cpu"
    if state.get_rank() == 0:  # only rank 0 logs; the peak is one device's
        meter = FlopsMeter.build(
            student_config, teacher_config if teacher is not None else None, args.seq_length, state.get_world_size(),
            torch.device(engine.device), student_dtype, args.teacher_dtype, args.recompute_granularity,
            args.peak_tflops,
        )  # fmt: skip
    try:
        for change in changes:
            logger.write(f"resuming with a changed setting (--override-checkpoint-args): {change}")
        for change in extensions:
            logger.write(f"resuming extends the run ({change}; every step taken keeps its learning rate and data)")
        logger.write(
            f"student: {_parameters(student.config)}; parent: {_parameters(parent_config)}; "
            f"teacher: {_parameters(teacher_config if teacher is not None else None)}; "
            f"tensor parallel {tp}, pipeline parallel {pp}{f' x {chunks} virtual (interleaved)' * (chunks > 1)}, "
            f"data parallel {dp_size}, ZeRO stage {zero_stage}, "
            f"global batch {global_batch} "
            f"= {args.micro_batch_size} x {accumulation} x {dp_size}"
        )
        if meter is not None:
            logger.write(
                f"precision: student {student_dtype}{' (fp32 master weights and optimizer state)' * args.bf16}, "
                f"teacher {args.teacher_dtype if teacher is not None else 'none'}; recompute "
                f"{args.recompute_granularity or 'off'}; compile {'on' if args.compile else 'off'}"
            )
            logger.write(
                f"FLOPs per token: student training {meter.student_per_token:.4g} (3x forward"
                f"{'' if args.recompute_granularity is None else f'; {meter.hardware_per_token:.4g} with recompute'}), "
                f"teacher forward {meter.teacher_per_token:.4g}; peak per device {meter.student_peak / 1e12:.3g} "
                f"TFLOP/s ({meter.peak_source})"
            )
            if on_cpu and "bf16" in (student_dtype, args.teacher_dtype):
                report = cpu_bf16_report()
                if report:
                    logger.write(report)
        meta = {
            "args": {k: v for k, v in settings.items() if isinstance(v, str | int | float | bool | list | None)},
            "model_config": student.config.to_dict(),
            "subnet": subnet.to_dict() if subnet is not None else None,
            "layout": layout,
            "run_id": run_id,
        }
        valid_batches = fixed_batches(valid_ds, args.eval_iters, args.micro_batch_size, dp_rank, dp_size)
        extra_batches = fixed_batches(extra_valid_ds, args.eval_iters, args.micro_batch_size, dp_rank, dp_size)

        def evaluation(iteration: int, tokens: int) -> float:
            """Score the validation batches (and the extra held-out text's); log them; the validation loss."""
            loss = evaluate(engine, valid_batches, engine.device)
            record = {"iteration": iteration, "tokens": tokens, "valid_loss": loss,
                      "valid_ppl": math.exp(min(loss, 50.0))}  # fmt: skip
            if extra_batches:
                extra = evaluate(engine, extra_batches, engine.device)
                record.update(extra_valid_loss=extra, extra_valid_ppl=math.exp(min(extra, 50.0)))
                final["extra_validation"] = extra
            logger.log(record)
            return loss

        final = {}
        sampler = PretrainingSampler(len(train_ds), consumed, args.micro_batch_size, dp_rank, dp_size)
        train_iter = micro_batches(train_ds, sampler)
        tokens_per_step = global_batch * args.seq_length
        skipped_in_a_row = steps_run = steps_applied = 0
        last_saved = None
        last_valid = None
        # the last checkpoint that holds a trained model: one of a run that applied no step is never "good"
        last_good = checkpoint.latest_checkpoint(args.load) if args.load and applied_before else None

        def save(iteration: int) -> Path:
            applied = applied_before + steps_applied
            path = checkpoint.save_checkpoint(
                engine, args.save, iteration, {**meta, "consumed_samples": consumed, "steps_applied": applied},
                args.keep_last,
            )  # fmt: skip
            nonlocal last_good
            last_good = path if applied else last_good
            return path

        def abort(message: str) -> TrainingAborted:
            logger.close()  # with the plot of what was trained
            return TrainingAborted(message)

        if valid_batches and iteration == 0:
            # Where the student starts: the quality of the initialisation is what sub-network selection buys.
            evaluation(0, 0)
        window_start, window_steps = time.perf_counter(), 0
        while iteration < train_iters:
            lr = schedule(iteration)
            result = train_step(engine, teacher, [next(train_iter) for _ in range(accumulation)], lr, kd)
            iteration += 1
            consumed += global_batch
            window_steps += 1
            steps_run += 1
            steps_applied += not result.skipped
            skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
            if result.skipped:
                logger.write(
                    f"iteration {iteration}: non-finite loss or gradient (loss {result.loss}, grad norm "
                    f"{result.grad_norm}); step skipped ({skipped_in_a_row} in a row)"
                )
            if iteration % args.log_interval == 0 or iteration == train_iters or result.skipped:
                elapsed = time.perf_counter() - window_start
                logger.log(
                    {
                        "iteration": iteration,
                        "loss": result.loss,
                        "ce": result.ce,
                        "kd": result.kd,
                        "lr": lr,
                        "grad_norm": result.grad_norm,
                        "skipped": result.skipped,
                        "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                        "tokens": consumed * args.seq_length,
                        "peak_memory_mb": peak_memory_mb(),
                        **(meter.rates(window_steps * tokens_per_step, elapsed) if meter else {}),
                        **(meter.totals(consumed * args.seq_length) if meter else {}),
                    }
                )
                window_start, window_steps = time.perf_counter(), 0
            if skipped_in_a_row >= args.max_skipped_steps:  # after the step's record is in metrics.jsonl
                good = last_good or "none"
                raise abort(
                    f"--max-skipped-steps {args.max_skipped_steps}: {skipped_in_a_row} non-finite "
                    f"steps in a row at iteration {iteration}; last good checkpoint: {good}"
                )
            logger.advance()
            if valid_batches and (iteration % args.eval_interval == 0 or iteration == train_iters):
                last_valid = evaluation(iteration, consumed * args.seq_length)
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                last_saved = save(iteration)
        if steps_run and not steps_applied:
            raise abort(
                f"every one of this run's {steps_run} steps was skipped (non-finite loss or gradient); nothing was "
                f"trained, no final model written; last good checkpoint: {last_good or 'none'}"
            )
        if iteration and not applied_before + steps_applied:  # resumed at the end of a run that trained nothing
            raise abort(
                f"--load {args.load}: every step of the run it continues was skipped (non-finite loss or gradient); "
                "nothing was trained, no final model written"
            )
        if args.save and (last_saved is None or last_saved.name != checkpoint.tag_for(iteration)):
            last_saved = save(iteration)
        test_batches = fixed_batches(test_ds, args.eval_iters, args.micro_batch_size, dp_rank, dp_size)
        if test_batches:
            final["test"] = evaluate(engine, test_batches, engine.device)
            test_ppl = math.exp(min(final["test"], 50.0))
            logger.log({"iteration": iteration, "test_loss": final["test"], "test_ppl": test_ppl})
        if last_valid is not None:
            final["validation"] = last_valid
        bad = [f"{name} loss {value}" for name, value in final.items() if not math.isfinite(value)]
        if bad:
            raise abort(f"the final {' and '.join(bad)}: the model is broken; no final model written")
        weights = checkpoint.consolidated_state_dict(engine, student.config) if args.save else None  # collective
        if args.save and state.get_rank() == 0:
            tokenizer_from = args.parent_load  # the student's vocabulary is the parent's
            save_model_checkpoint(
                Path(args.save) / checkpoint.FINAL_MODEL,
                student.config,
                weights,
                tokenizer_from,
                subnet.to_dict() if subnet is not None else None,
            )
            final_model = Path(args.save) / checkpoint.FINAL_MODEL
            logger.write(f"final model: {final_model} (tools/convert_checkpoint.py export)")
        state.barrier()
        logger.close()
    except BaseException:
        logger.close(plot=False)  # ends the progress bar's line, so an error is a line of its own
        raise
    return 0


def _main(argv: list[str] | None) -> int:
    from megatron_subnet.arguments import parse_args

    args = parse_args(argv)
    try:
        return pretrain(args)
    except TrainingAborted as e:
        from megatron_subnet.cli import report

        report(e, 2)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``pretrain_slm.py``: errors are one ``error:`` line and exit 2, Ctrl-C exit 130."""
    from megatron_subnet.cli import run_main

    return run_main(_main, argv)
