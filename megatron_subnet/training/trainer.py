"""The pretraining run: build student, teacher and data, then iterate, log, evaluate and checkpoint."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megatron_subnet.arguments import load_ds_config, reconcile_ds_config
from megatron_subnet.data.gpt_dataset import PretrainingSampler, build_train_valid_test_datasets
from megatron_subnet.initialize import barrier, initialize_distributed, rank, set_seed
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.subnet import SubnetConfig, extract_state_dict
from megatron_subnet.model.weights import load_checkpoint as load_model_checkpoint
from megatron_subnet.model.weights import save_checkpoint as save_model_checkpoint
from megatron_subnet.parallel import state
from megatron_subnet.training import checkpoint
from megatron_subnet.training.engine import (
    Teacher,
    build_optimizer,
    evaluate,
    initialize_student,
    train_step,
)
from megatron_subnet.training.metrics import MetricsLogger, peak_memory_mb
from megatron_subnet.training.schedules import LRSchedule


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row."""


def _load_importance(path: str | None):
    if path is None:
        return None
    from megatron_subnet.model.importance import load_importance

    return load_importance(path)


def build_student(
    args: argparse.Namespace, teacher_config: ModelConfig | None, teacher_state: dict | None, resume_meta: dict | None
) -> tuple[GPTModel, dict | None]:
    """The student model (weights from the teacher, random, or to be overwritten by --load) and its subnet."""
    if resume_meta is not None:
        config = ModelConfig.from_dict(resume_meta["model_config"])
        return GPTModel(config), resume_meta.get("subnet")
    subnet = None
    if args.subnet:
        subnet = SubnetConfig.load(args.subnet, teacher_config, _load_importance(args.importance))
    if args.init == "subnet":
        config, weights = extract_state_dict(teacher_config, teacher_state, subnet)
        model = GPTModel(config)
        model.load_state_dict(weights)
        return model, subnet.to_dict()
    config = subnet.student_config(teacher_config) if subnet is not None else ModelConfig.load(args.model_config)
    return GPTModel(config), subnet.to_dict() if subnet is not None else None


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
    ds_config = reconcile_ds_config(args, load_ds_config(args.ds_config), dp_size)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    layout = {"world_size": dp_size, "zero_stage": zero_stage, "bf16": args.bf16}
    resume_meta = checkpoint.read_meta(args.load) if args.load else None
    if resume_meta is not None:
        checkpoint.check_layout(resume_meta, layout, None, args.load)

    teacher_config, teacher_state = load_model_checkpoint(args.teacher_load) if args.teacher_load else (None, None)
    student, subnet = build_student(args, teacher_config, teacher_state, resume_meta)
    teacher = None
    if args.kd_alpha > 0:
        if teacher_config.vocab_size != student.config.vocab_size:
            raise checkpoint.ResumeError(
                f"--teacher-load {args.teacher_load}: vocabulary {teacher_config.vocab_size} "
                f"differs from the student's {student.config.vocab_size}"
            )
        teacher_model = GPTModel(teacher_config)
        teacher_model.load_state_dict(teacher_state)
        teacher = Teacher(teacher_model, ds_config, device)
    del teacher_state

    global_batch, accumulation = args.global_batch_size, args.gradient_accumulation_steps
    evals = args.train_iters // args.eval_interval + 1
    num_samples = (
        args.train_iters * global_batch,
        evals * args.eval_iters * global_batch,
        args.eval_iters * global_batch,
    )
    data_args = (args.data_path, args.split, args.seq_length, args.seed, num_samples, args.data_cache_path)
    if rank() == 0:
        build_train_valid_test_datasets(*data_args)  # builds and caches the indices once
    barrier()
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(*data_args)
    if train_ds is None:
        raise ValueError(f"--split {args.split}: the train split is empty")

    optimizer = build_optimizer(student, args.lr, args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_eps)
    engine = initialize_student(student, optimizer, ds_config)
    iteration, consumed = 0, 0
    if args.load:
        meta = checkpoint.load_checkpoint(engine, args.load)
        iteration, consumed = meta["iteration"], meta["consumed_samples"]

    schedule = LRSchedule(
        args.lr, args.min_lr, args.lr_warmup_iters, args.train_iters, args.lr_decay_style, args.lr_wsd_decay_iters or 0
    )
    log_dir = Path(args.log_dir or args.save or "runs/latest")
    logger = MetricsLogger(log_dir, rank() == 0, args.train_iters, iteration)
    logger.write(
        f"student: {student.config.num_parameters():,} parameters "
        f"({student.config.num_parameters(False):,} non-embedding); teacher: "
        f"{'none' if teacher is None else f'{teacher_config.num_parameters():,}'}; "
        f"data parallel {dp_size}, ZeRO stage {zero_stage}, global batch {global_batch} "
        f"= {args.micro_batch_size} x {accumulation} x {dp_size}"
    )
    meta = {
        "args": {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list | None)},
        "model_config": student.config.to_dict(),
        "subnet": subnet,
        "layout": layout,
    }
    valid_batches = fixed_batches(valid_ds, args.eval_iters, args.micro_batch_size, dp_rank, dp_size)
    sampler = PretrainingSampler(len(train_ds), consumed, args.micro_batch_size, dp_rank, dp_size)
    train_iter = micro_batches(train_ds, sampler)
    tokens_per_step = global_batch * args.seq_length
    skipped_in_a_row = 0
    last_saved = None
    resumed_from = checkpoint.latest_checkpoint(args.load) if args.load else None
    if valid_batches and iteration == 0:
        # Where the student starts: the quality of the initialisation is what sub-network selection buys.
        loss = evaluate(engine, valid_batches, engine.device)
        logger.log({"iteration": 0, "tokens": 0, "valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))})
    window_start, window_steps = time.perf_counter(), 0
    while iteration < args.train_iters:
        lr = schedule(iteration)
        result = train_step(engine, teacher, [next(train_iter) for _ in range(accumulation)], lr, args)
        iteration += 1
        consumed += global_batch
        window_steps += 1
        skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
        if result.skipped:
            logger.write(
                f"iteration {iteration}: non-finite loss or gradient (loss {result.loss}, grad norm "
                f"{result.grad_norm}); step skipped ({skipped_in_a_row} in a row)"
            )
        if iteration % args.log_interval == 0 or iteration == args.train_iters or result.skipped:
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
                }
            )
            window_start, window_steps = time.perf_counter(), 0
        if skipped_in_a_row >= args.max_skipped_steps:  # after the step's record is in metrics.jsonl
            logger.close()  # ends the progress bar's line, so the error is a line of its own
            good = last_saved or resumed_from or "none"
            raise TrainingAborted(
                f"--max-skipped-steps {args.max_skipped_steps}: {skipped_in_a_row} non-finite "
                f"steps in a row at iteration {iteration}; last good checkpoint: {good}"
            )
        logger.advance()
        if valid_batches and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
            loss = evaluate(engine, valid_batches, engine.device)
            logger.log(
                {
                    "iteration": iteration,
                    "tokens": consumed * args.seq_length,
                    "valid_loss": loss,
                    "valid_ppl": math.exp(min(loss, 50.0)),
                }
            )
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            last_saved = checkpoint.save_checkpoint(
                engine, args.save, iteration, {**meta, "consumed_samples": consumed}, args.keep_last
            )
    if args.save and (last_saved is None or last_saved.name != checkpoint.tag_for(iteration)):
        last_saved = checkpoint.save_checkpoint(
            engine, args.save, iteration, {**meta, "consumed_samples": consumed}, args.keep_last
        )
    test_batches = fixed_batches(test_ds, args.eval_iters, args.micro_batch_size, dp_rank, dp_size)
    if test_batches:
        loss = evaluate(engine, test_batches, engine.device)
        logger.log({"iteration": iteration, "test_loss": loss, "test_ppl": math.exp(min(loss, 50.0))})
    if args.save and rank() == 0:
        weights = checkpoint.consolidated_state_dict(engine, last_saved)
        tokenizer_from = args.teacher_load
        save_model_checkpoint(Path(args.save) / "final_model", student.config, weights, tokenizer_from, subnet)
        logger.write(f"final model: {Path(args.save) / 'final_model'} (tools/convert_checkpoint.py export)")
    barrier()
    logger.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_subnet.arguments import ArgumentError, parse_args
    from megatron_subnet.model.config import ConfigError
    from megatron_subnet.model.weights import CheckpointError

    try:
        args = parse_args(argv)
        return pretrain(args)
    except (ArgumentError, ConfigError, CheckpointError, checkpoint.ResumeError, TrainingAborted, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
