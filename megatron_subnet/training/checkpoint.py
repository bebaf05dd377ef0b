"""Training checkpoints: DeepSpeed's own engine/optimizer files plus ours, written atomically.

    SAVE/latest                       the tag of the newest complete checkpoint (moved into place last)
    SAVE/iter_0000100/                DeepSpeed's model and (partitioned) optimizer states
    SAVE/iter_0000100/megatron_subnet.json   iteration, consumed samples, args, model config, sub-network, layout
    SAVE/iter_0000100/rng/rank_00000.json    RNG states of every rank

Each checkpoint is written as ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, so a
process killed mid-write leaves the previous checkpoint and ``latest`` untouched.

A run carries a ``run_id`` from its first step to its last resume. ``--keep-last`` prunes only that run's
checkpoints, by iteration number, and never the one ``latest`` names; checkpoints of other runs in the same
directory are never deleted. ``check_save_dir`` decides, before any work, whether a run may write into a
``--save`` directory at all.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.outputs import temp_sibling, write_text_atomically
from megatron_subnet.parallel import state
from megatron_subnet.training.schedules import schedule_from_args

META_NAME = "megatron_subnet.json"
LATEST = "latest"
FINAL_MODEL = "final_model"
_TAG = re.compile(r"iter_(\d+)")


class ResumeError(ValueError):
    """A checkpoint that does not fit the launch (layout, model) or is incomplete."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def save_checkpoint(engine, save_dir: str, iteration: int, meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    save = Path(save_dir)
    tag = tag_for(iteration)
    tmp_tag = f"{tag}.tmp"
    if state.get_rank() == 0:
        save.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(save / tmp_tag, ignore_errors=True)
    state.barrier()
    engine.save_checkpoint(str(save), tag=tmp_tag, client_state={"iteration": iteration}, save_latest=False)
    rng_dir = save / tmp_tag / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(rng_dir / f"rank_{state.get_rank():05d}.json", json.dumps(rng_state()))
    if state.get_rank() == 0:
        write_text_atomically(save / tmp_tag / META_NAME, json.dumps({**meta, "iteration": iteration}, indent=1))
    state.barrier()
    if state.get_rank() == 0:
        publish(save, tmp_tag, tag)
        _prune(save, meta["run_id"], keep_last)
    state.barrier()
    return save / tag


def publish(save: Path, tmp_tag: str, tag: str) -> None:
    """Rename the finished ``tmp_tag`` to ``tag`` (replacing an older ``tag``), then point ``latest`` at it."""
    if (save / tag).exists():  # a tag of this run redone after a resume, or replaced with --overwrite
        old = temp_sibling(save / tag, "old")
        os.replace(save / tag, old)
        os.replace(save / tmp_tag, save / tag)
        shutil.rmtree(old)
    else:
        os.replace(save / tmp_tag, save / tag)
    write_text_atomically(save / LATEST, tag)


def complete_checkpoints(save: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``save``, by iteration number."""
    found = []
    for path in save.iterdir() if save.is_dir() else []:
        match = _TAG.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _meta(checkpoint: Path) -> dict:
    """The checkpoint's metadata, or {} when it cannot be read."""
    try:
        meta = json.loads((checkpoint / META_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _run_id(checkpoint: Path) -> str | None:
    return _meta(checkpoint).get("run_id")


def is_universal(meta: dict) -> bool:
    """Whether the checkpoint of ``meta`` is a universal one (``tools/convert_checkpoint.py universal``)."""
    return "universal" in meta


def _prune(save: Path, run_id: str, keep_last: int) -> None:
    """Delete this run's checkpoints but the newest ``keep_last`` (and never the one ``latest`` names, nor a
    universal checkpoint: the user made it)."""
    latest = (save / LATEST).read_text().strip() if (save / LATEST).is_file() else None
    ours = [path for _, path in complete_checkpoints(save)
            if _run_id(path) == run_id and not is_universal(_meta(path))]  # fmt: skip
    for old in ours[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def check_save_dir(
    save_dir: str, load_dir: str | None, run_id: str | None, overwrite: bool, resumes_at: int | None = None
) -> None:
    """ResumeError when ``--save`` holds another run's checkpoints or final model, or (a resume from iteration
    ``resumes_at`` of another directory, a universal checkpoint say) a checkpoint of a later iteration the
    resumed steps would replace, and ``--overwrite`` is not given.

    The directory is this run's when ``--load`` is the same directory, or when its ``latest`` checkpoint has
    this run's ``run_id`` (``run_id`` None: a new run).
    """
    save = Path(save_dir)
    if overwrite or not save.is_dir():
        return
    if load_dir is not None and Path(load_dir).resolve() == save.resolve():
        return  # Megatron's --load X --save X: the run redoes its steps after the checkpoint it resumes from
    checkpoints = complete_checkpoints(save)
    later = [path.name for iteration, path in checkpoints if resumes_at is not None and iteration > resumes_at]
    if later:
        raise ResumeError(
            f"--save {save_dir}: holds {later[-1]}, later than the checkpoint this run resumes from (iteration "
            f"{resumes_at}) in another directory; the resumed steps would replace it: choose a new --save, or pass "
            "--overwrite"
        )
    held = [p.name for _, p in checkpoints[-2:]] + [n for n in (LATEST, FINAL_MODEL) if (save / n).exists()]
    if not held:
        return
    if run_id is not None and (save / LATEST).is_file():
        latest = save / (save / LATEST).read_text().strip()
        if _run_id(latest) == run_id:
            return
    raise ResumeError(
        f"--save {save_dir}: holds another run's checkpoints ({', '.join(held)}); resume that run with "
        f"--load {save_dir}, choose a new --save, or pass --overwrite to start a new run there"
    )


# Settings that shape the data order or the training objective: a resume that changes them is not the same run.
RESUME_ARGS = (
    "data_path", "split", "seq_length", "seed", "global_batch_size", "train_iters", "train_tokens",
    "kd_alpha", "kd_loss", "kd_temperature", "kd_topk", "data_order",
)  # fmt: skip
SAVED_BEFORE = {"data_order": 1}  # what a checkpoint that does not record a setting had


# The run's length: a resume may change it when the learning rate of every step already taken stays the same
# (a constant or WSD schedule, resumed before its decay), since the data order does not depend on it.
LENGTH_ARGS = ("train_iters", "train_tokens")


def changed_args(meta: dict, args: dict) -> list[str]:
    """``"name: old -> new"`` for every RESUME_ARGS setting where this launch differs from the checkpoint."""
    saved = {**SAVED_BEFORE, **meta.get("args", {})}
    extends = _same_schedule_so_far(meta, args) and (args.get("train_iters") or 0) >= int(meta["iteration"])
    changes = []
    for name in RESUME_ARGS:
        if name in saved and saved[name] != args.get(name) and not (name in LENGTH_ARGS and extends):
            if name == "data_order":
                changes.append(f"the data order: {saved[name]} -> {args.get(name)} (the checkpoint was written "
                               "before the sample order stopped depending on the run's length)")  # fmt: skip
            else:
                changes.append(f"--{name.replace('_', '-')}: {saved[name]} -> {args.get(name)}")
    return changes


def extended_args(meta: dict, args: dict) -> list[str]:
    """``"name: old -> new"`` for the run-length settings this launch changes without ``changed_args``
    objecting (an extension of the run)."""
    saved = meta.get("args", {})
    return [f"--{name.replace('_', '-')}: {saved[name]} -> {args.get(name)}" for name in LENGTH_ARGS
            if name in saved and saved[name] != args.get(name)]  # fmt: skip


def _same_schedule_so_far(meta: dict, args: dict) -> bool:
    """Whether this launch's learning-rate schedule gives the steps the checkpoint took the rates they had."""
    saved = meta.get("args", {})
    try:
        before = schedule_from_args(saved, saved["train_iters"])
        after = schedule_from_args(args, args["train_iters"])
        return before == after or all(before(i) == after(i) for i in range(int(meta["iteration"])))
    except (KeyError, TypeError):  # a checkpoint that did not record its schedule (or its length)
        return False


def latest_checkpoint(load_dir: str, flag: str = "--load") -> Path:
    """The directory ``latest`` names; ResumeError (naming ``flag``) when there is none or it is incomplete."""
    load = Path(load_dir)
    latest = load / LATEST
    if not latest.is_file():
        raise ResumeError(f"{flag} {load_dir}: no '{LATEST}' file, so no complete checkpoint")
    path = load / latest.read_text().strip()
    if not path.is_dir():
        raise ResumeError(f"{flag} {load_dir}: '{LATEST}' names {path.name}, which does not exist")
    if not (path / META_NAME).is_file():
        raise ResumeError(f"{flag} {load_dir}: {path.name} is incomplete (no {META_NAME})")
    return path


def read_meta(load_dir: str) -> dict:
    return read_meta_file(latest_checkpoint(load_dir), f"--load {load_dir}")


def read_meta_file(checkpoint: Path, where: str) -> dict:
    """The metadata of the checkpoint directory ``checkpoint``; ResumeError starting with ``where``."""
    path = checkpoint / META_NAME
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{where}: {path} is corrupt ({e})") from None
    if not isinstance(meta, dict) or not {"iteration", "layout", "model_config"} <= meta.keys():
        raise ResumeError(f"{where}: {path} is not a checkpoint's metadata")
    return meta


UNIVERSAL_ZERO_STAGES = (1, 2)  # the ZeRO optimizers whose partitions DeepSpeed converts and loads here

# The layout a universal checkpoint is free of (``training/universal.py``).
PARALLEL_LAYOUT = (
    "world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "zero_stage", "pipeline_layer_split",
)  # fmt: skip


def conversion_command(load_dir: str) -> str:
    """The command line that makes a universal checkpoint of ``load_dir``."""
    output = shlex.quote(load_dir.rstrip("/") + "_universal")
    return f"python tools/convert_checkpoint.py universal --input {shlex.quote(load_dir)} --output {output}"


def check_layout(meta: dict, layout: dict, model_config: ModelConfig | None, load_dir: str,
                 universal: bool = False) -> None:  # fmt: skip
    """ResumeError naming the first setting where the checkpoint and this launch differ. A universal checkpoint
    (``universal``: the launch says it loads one) resumes at any parallel layout and ZeRO stage."""
    if is_universal(meta) and not universal:
        raise ResumeError(f"--load {load_dir}: is a universal checkpoint; resume from it with --universal-checkpoint")
    if universal and not is_universal(meta):
        raise ResumeError(f"--universal-checkpoint: --load {load_dir} is not a universal checkpoint; make one "
                          f"with: {conversion_command(load_dir)}")  # fmt: skip
    for key, value in layout.items():
        if universal and key in PARALLEL_LAYOUT:
            continue
        saved = meta["layout"].get(key, 1 if key.endswith("_parallel_size") else None)  # older checkpoints
        if saved != value:
            hint = ""
            stages = (meta["layout"].get("zero_stage", 0), layout.get("zero_stage", 0))
            if key in PARALLEL_LAYOUT and all(stage in UNIVERSAL_ZERO_STAGES for stage in stages):
                hint = (f"; to resume at another layout, convert it ({conversion_command(load_dir)}) and resume "
                        "with --load on the output and --universal-checkpoint")  # fmt: skip
            raise ResumeError(
                f"--load {load_dir}: checkpoint was written with {key}={saved}, "
                f"this launch has {key}={value}{hint}"
            )
    if model_config is not None and meta["model_config"] != model_config.to_dict():
        raise ResumeError(f"--load {load_dir}: the checkpoint's model config differs from this launch's student")


def check_layer_split(meta: dict, counts: list[int], load_dir: str) -> None:
    """ResumeError naming the flag when this launch splits the student's layers over its pipeline stages
    otherwise than the checkpoint did (each stage's files hold its own layers). Older checkpoints recorded
    no split: DeepSpeed's own shape check stands for them."""
    saved = meta["layout"].get("pipeline_layer_split")
    if saved is not None and saved != counts:
        split = ",".join(map(str, saved))
        raise ResumeError(
            f"--load {load_dir}: its pipeline stages hold {split} layers, this launch splits them "
            f"{','.join(map(str, counts))}; resume with --pipeline-layer-split {split}"
        )


def _rank_files(engine, load_dir: str, tag: str) -> list[str]:
    """The files of checkpoint ``tag`` that DeepSpeed will read for this rank (its model states and, under ZeRO,
    its optimizer partition), by DeepSpeed's own naming; [] where this DeepSpeed does not tell."""
    names = []
    if hasattr(engine, "_get_ckpt_name"):
        names.append(engine._get_ckpt_name(load_dir, tag))
    if engine.zero_optimization() and hasattr(engine, "_get_zero_ckpt_name"):
        names.append(engine._get_zero_ckpt_name(load_dir, tag))
    return names


def _universal_files(engine, path: Path) -> list[str]:
    """The files of universal checkpoint ``path`` this rank reads: the optimizer's settings, the first
    model-state file (DeepSpeed's bookkeeping), and the whole fp32 weight and Adam moments of each of its
    parameters (DeepSpeed cuts this rank's slice)."""
    zero = path / "zero"
    names = [zero / "optimizer_state.pt", path / "mp_rank_00_model_states.pt"]
    for name, _ in engine.module.named_parameters():
        names += [zero / name / f"{key}.pt" for key in ("fp32", "exp_avg", "exp_avg_sq")]
    return [str(n) for n in names]


def _optimizer_steps_to_parameters(engine) -> None:
    """DeepSpeed restores Adam's step count of a universal checkpoint as a CPU tensor; the fused kernel reads
    it on the parameters' device (as torch's own ``load_state_dict`` puts it)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in optimizer.param_groups:
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[param]["step"] = step.to(param.device)


def load_checkpoint(engine, load_dir: str) -> dict:
    """Restore engine, optimizer and this rank's RNG; returns our metadata (iteration, consumed samples...).
    A universal checkpoint is cut for this launch's layout by DeepSpeed (``checkpoint.load_universal``)."""
    path, meta = latest_checkpoint(load_dir), read_meta(load_dir)
    universal = is_universal(meta)
    files = _universal_files(engine, path) if universal else _rank_files(engine, load_dir, path.name)
    # every rank learns of any rank's missing file, so that all stop alike (none waits in a collective)
    missing = sorted({n for names in state.all_gather_object(files) for n in names if not os.path.isfile(n)})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ResumeError(f"--load {load_dir}: {missing[0]} is missing{more}")
    loaded, _ = engine.load_checkpoint(
        load_dir, tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise ResumeError(f"--load {load_dir}: DeepSpeed could not load {path.name}")
    if universal:
        _optimizer_steps_to_parameters(engine)
    rng_file = path / "rng" / f"rank_{state.get_rank():05d}.json"
    if universal and not rng_file.is_file():  # saved by fewer ranks; training draws no random numbers
        rng_file = path / "rng" / "rank_00000.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return meta


def consolidated_state_dict(engine, config: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The student's full fp32 weights (DeepSpeed's fp32 master copy under ZeRO or bf16, gathered over the
    data-parallel group, then the tensor-parallel shards merged and the pipeline stages joined) on global
    rank 0; None elsewhere. Collective: every rank calls it."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from megatron_subnet.model.weights import merge_state_dicts

    local = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # collective under ZeRO; None for plain fp32 data parallelism
        local[name] = (param.detach() if full is None else full).float().cpu().clone()
    if state.DeepSpeedMPU.get_model_parallel_world_size() == 1:
        return local if state.get_rank() == 0 else None
    if state.get_data_parallel_rank() != 0:  # one replica's model-parallel ranks hold the whole model
        return None
    coords = (state.get_tensor_model_parallel_rank(), state.get_pipeline_model_parallel_rank())
    parts = [None] * state.DeepSpeedMPU.get_model_parallel_world_size() if state.get_rank() == 0 else None
    dist.gather_object((coords, local), parts, dst=0, group=state.mpu.get_model_parallel_group())
    if state.get_rank() != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for p in range(state.get_pipeline_model_parallel_world_size()):
        shards = [part for (t, q), part in sorted(parts, key=lambda x: x[0]) if q == p]
        for name, tensor in merge_state_dicts(config, shards).items():
            merged.setdefault(name, tensor)  # a tied embedding's last-stage copy equals the first's
    return merged
