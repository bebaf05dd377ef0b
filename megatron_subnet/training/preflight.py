"""What a run checks from its flags and JSON files before any weights or data are read: the parent it is cut
from, what a resume changes, the outputs it may write, the student's and teacher's shapes and splits."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_subnet.cli import same_on_every_rank
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.shapes import check_divisible
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import load_config
from megatron_subnet.parallel.pipeline import split_layers
from megatron_subnet.training import checkpoint
from megatron_subnet.training.config import TrainConfig


def same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def load_importance(path: str | None):
    if path is None:
        return None
    from megatron_subnet.model.importance import load_importance

    return load_importance(path)


def _saved_parent(resume_meta: dict) -> str | None:
    """The parent a checkpoint's run was cut from; checkpoints from before --parent-load had the teacher."""
    saved = resume_meta.get("args", {})
    return saved["parent_load"] if "parent_load" in saved else saved.get("teacher_load")


def resolve_parent(config: TrainConfig, resume_meta: dict | None) -> tuple[str | None, str | None]:
    """The parent checkpoint of this run and, resuming, the change of parent this launch asks for (a
    ``"--parent-load: old -> new"`` like ``checkpoint.changed_args``'s, or None).

    The parent is --parent-load as given; without it, resuming, the checkpoint's parent (when it still
    exists); else --teacher-load."""
    saved = _saved_parent(resume_meta) if resume_meta is not None else None
    parent = config.model.parent_load
    if parent is not None:
        change = None
        if saved is not None and not same_path(saved, parent):
            change = f"--parent-load: {saved} -> {parent}"
        return parent, change
    if saved is not None and os.path.isdir(saved):
        return saved, None
    return config.distill.teacher_load, None


def teacher_change(config: TrainConfig, resume_meta: dict | None) -> str | None:
    """Resuming a distillation run with another --teacher-load: ``"--teacher-load: old -> new"``, else None."""
    saved = (resume_meta or {}).get("args", {})
    old, new = saved.get("teacher_load"), config.distill.teacher_load
    if config.distill.kd_alpha == 0 or not saved.get("kd_alpha") or old is None or same_path(old, new):
        return None
    return f"--teacher-load: {old} -> {new}"


def student_changes(config: TrainConfig, resume_meta: dict) -> list[str]:
    """Resuming: the flags that define the student (``--init``, ``--subnet``, ``--model-config``) where this
    launch's differ from the checkpoint's student, as ``"--flag: old -> new"`` (sub-networks and configs
    compared by content, not by path). The checkpoint's student is what a resume trains."""
    saved, m = resume_meta.get("args", {}), config.model
    changes = []
    if "init" in saved and saved["init"] != m.init:
        changes.append(f"--init: {saved['init']} -> {m.init}")
    if m.subnet and m.parent_load:
        subnet = SubnetConfig.load(m.subnet, load_config(m.parent_load), load_importance(m.importance))
        old = resume_meta.get("subnet")
        if old is None or SubnetConfig(**old).to_dict() != subnet.to_dict():
            changes.append(f"--subnet: {saved.get('subnet')} -> {m.subnet} (another sub-network)")
    elif m.model_config and resume_meta.get("subnet") is None:
        if ModelConfig.load(m.model_config).to_dict() != resume_meta["model_config"]:
            changes.append(f"--model-config: {saved.get('model_config')} -> {m.model_config} (another student)")
    return changes


def resume_changes(
    config: TrainConfig, resume_meta: dict, settings: dict, parent_change: str | None
) -> tuple[list[str], list[str]]:
    """What this launch changes in the run it resumes (a ResumeError unless --override-checkpoint-args) and,
    when nothing, how it extends the run (a longer schedule)."""
    changes = (
        checkpoint.changed_args(resume_meta, settings)
        + student_changes(config, resume_meta)
        + [change for change in (parent_change, teacher_change(config, resume_meta)) if change]
    )
    load = config.checkpoint.load
    if changes and not config.checkpoint.override_checkpoint_args:
        raise checkpoint.ResumeError(
            f"--load {load}: this launch changes what the checkpoint was trained on ({'; '.join(changes)}); "
            "use the checkpoint's settings, or pass --override-checkpoint-args if you mean it"
        )
    return changes, [] if changes else checkpoint.extended_args(resume_meta, settings)


def _data_files(data_path: list[str]) -> list[str]:
    from megatron_subnet.data.gpt_dataset import parse_data_path
    from megatron_subnet.data.indexed import bin_path, idx_path

    return [f for _, prefix in parse_data_path(data_path) for f in (bin_path(prefix), idx_path(prefix))]


def _inputs(config: TrainConfig) -> dict[str, str | None]:
    """Every file the run reads, by the flag that names it."""
    m, d, data = config.model, config.distill, config.data
    extra = data.extra_valid_data_path
    return {
        "--teacher-load": d.teacher_load,
        # the parent (read again at the end, for the final model's tokenizer), named apart when it is not the teacher
        **({"--parent-load": m.parent_load} if m.parent_load != d.teacher_load else {}),
        "--subnet": m.subnet,
        "--importance": m.importance,
        "--model-config": m.model_config,
        "--ds_config": config.ds_config,
        **{f"--data-path ({Path(f).name})": f for f in _data_files(data.data_path)},
        **{f"--extra-valid-data-path ({Path(f).name})": f for f in (_data_files([extra]) if extra else [])},
    }


def check_outputs(config: TrainConfig, log_dir: Path, run_id: str | None, resumes_at: int | None) -> bool:
    """Refuse, before any work, outputs this run may not write (see ``outputs.py``); returns whether the
    metrics file starts anew (a new run with --overwrite). ``resumes_at``: the iteration a resume starts from."""
    resuming = resumes_at is not None
    from megatron_subnet.outputs import OutputError, check_not_nested, check_writable_location

    c = config.checkpoint
    inputs = _inputs(config)
    rewritten = [log_dir / "metrics.jsonl", log_dir / "loss_curve.png", log_dir / "tensorboard"]
    if c.save:
        check_writable_location(c.save, "--save", "dir")
        checkpoint.check_save_dir(c.save, c.load, run_id, c.overwrite, resumes_at)
        rewritten.append(Path(c.save) / checkpoint.FINAL_MODEL)
        save = Path(c.save).resolve()
        for flag, path in inputs.items():
            resolved = Path(path).resolve() if path else None
            parts = resolved.relative_to(save).parts if resolved and resolved.is_relative_to(save) else ()
            if parts[:1] and parts[0].startswith("iter_"):
                raise OutputError(f"--save {c.save}: {flag} {path} lies in a checkpoint this run may replace")
    for output in rewritten:
        check_not_nested(output, "--save" if output.name == checkpoint.FINAL_MODEL else "--log-dir", inputs)
    check_writable_location(log_dir, "--log-dir", "dir")
    metrics = log_dir / "metrics.jsonl"
    if resuming or not metrics.exists():
        return False
    if c.overwrite:
        return True
    raise OutputError(
        f"--log-dir {log_dir}: holds another run's metrics.jsonl; choose a new --log-dir (or --save) or pass "
        "--overwrite to start it anew"
    )


def plan_student(
    config: TrainConfig, parent_config: ModelConfig | None, resume_meta: dict | None
) -> tuple[ModelConfig, SubnetConfig | None]:
    """The student's architecture and the sub-network of the parent it is cut from (None for a random
    student without one), from the configs alone: nothing is loaded but JSON."""
    if resume_meta is not None:
        subnet = resume_meta.get("subnet")
        student = ModelConfig.from_dict(resume_meta["model_config"])
        return student, None if subnet is None else SubnetConfig(**subnet)
    m = config.model
    subnet = SubnetConfig.load(m.subnet, parent_config, load_importance(m.importance)) if m.subnet else None
    if subnet is not None:
        return subnet.student_config(parent_config), subnet
    return ModelConfig.load(m.model_config), None


def check_teacher_vocabulary(config: TrainConfig, teacher: ModelConfig, student: ModelConfig, origin: str) -> None:
    """The teacher distils into the student's vocabulary; ``origin`` names where the student's comes from."""
    if teacher.vocab_size != student.vocab_size:
        raise checkpoint.ResumeError(
            f"--teacher-load {config.distill.teacher_load}: vocabulary {teacher.vocab_size} differs from the "
            f"student's {student.vocab_size} ({origin}); the teacher needs the student's vocabulary"
        )


def stage_split(config: TrainConfig, name: str, model: ModelConfig) -> list[int]:
    """The layers per (virtual) pipeline stage of the student (the split flags) or the teacher (even), after
    checking that the tensor-parallel size divides the model; one line naming the model otherwise."""
    p = config.parallel
    ends = (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)
    split = p.pipeline_layer_split if name == "student" else None
    try:
        check_divisible(model, p.tensor_model_parallel_size)
        return split_layers(
            model.num_layers, p.pipeline_model_parallel_size, split,
            *(ends if name == "student" else (None, None)), chunks=p.virtual_pipeline_model_parallel_size,
        )  # fmt: skip
    except ValueError as e:
        raise same_on_every_rank(ValueError(f"the {name} cannot be split: {e}")) from None
