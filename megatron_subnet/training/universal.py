"""Universal checkpoints: a training checkpoint in DeepSpeed's layout-free form, to resume at another TP x PP x DP.

    python tools/convert_checkpoint.py universal --input SAVE [--iteration N] --output UCKPT
    deepspeed pretrain_slm.py ... --load UCKPT --universal-checkpoint

DeepSpeed does the work: its converter (``deepspeed.checkpoint.ds_to_universal``) joins every parameter's ZeRO
fragments over the data-parallel ranks and its slices over the tensor-parallel ranks into whole tensors (fp32
weight, Adam's ``exp_avg`` and ``exp_avg_sq``, the step) under ``zero/NAME/``; its loader (the ds_config's
``checkpoint.load_universal``) cuts each rank's slice for the new layout. What it needs to know of our tensors
is ``checkpoint_info``, which every checkpoint's model states carry (the engine's module attribute):

- row-parallel weights (``linear_proj``, ``linear_fc2``) are joined along their columns, everything else split
  over tensor-parallel ranks along its rows;
- tensors replicated over tensor-parallel ranks (norms, row-parallel biases) are taken once;
- the fused QKV rows are grouped by query group and a rank holds a contiguous block of groups
  (``model/qkv.py``), so joining the ranks' rows gives the one-process layout and cutting it anew gives any
  other rank's: no sub-parameter description is needed;
- the vocabulary (embedding, untied output layer) is not padded;
- a tied embedding's copy on the last pipeline stage is the first stage's (taken once).

What DeepSpeed's format has no place for, we add beside it: our metadata (``megatron_subnet.json``: iteration,
consumed samples, settings, the layout it was saved at) and each rank's RNG state.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.outputs import write_directory_atomically
from megatron_subnet.training import checkpoint
from megatron_subnet.training.checkpoint import UNIVERSAL_ZERO_STAGES, ResumeError, is_universal

LATEST_UNIVERSAL = "latest_universal"  # DeepSpeed's name for the tag a universal checkpoint directory holds


def _pattern(name: str) -> str:
    """A regular expression for ``name`` that matches the same tensor of every layer."""
    return "^" + re.sub(r"layers\\\.\d+\\\.", r"layers\\.\\d+\\.", re.escape(name)) + "$"


def checkpoint_info(config: ModelConfig) -> dict:
    """DeepSpeed's ``universal_checkpoint_info`` for a model of ``config`` (every pattern matches a parameter,
    as DeepSpeed's converter checks)."""
    with torch.device("meta"):
        params = dict(GPTModel(config).named_parameters())
    replicated, rows, vocabulary = [], [], []
    for name, param in params.items():
        split = getattr(param, "tensor_model_parallel", False)
        if name.startswith(("embedding.", "output_layer.")):
            vocabulary.append(_pattern(name))
        elif not split:
            replicated.append(_pattern(name))
        elif param.partition_dim == 1:
            rows.append(_pattern(name))
    info = {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": sorted(set(replicated)),
        "parameter_with_row_parallelism_patterns": sorted(set(rows)),
        "vocabulary_parameter_patterns": sorted(set(vocabulary)),
        "original_vocab_size": config.vocab_size,
        "padded_vocab_size": config.vocab_size,
    }
    if config.tie_word_embeddings:
        info["pipeline_replicated_parameter_patterns"] = [_pattern("embedding.weight")]
    return info


def source_checkpoint(save_dir: str, iteration: int | None) -> tuple[Path, dict]:
    """The checkpoint of ``iteration`` in ``save_dir`` (default: the one ``latest`` names) and its metadata,
    checked to be convertible; ResumeError naming the flag otherwise."""
    if not Path(save_dir).is_dir():
        raise ResumeError(f"--input {save_dir}: no such directory")
    if iteration is None:
        path = checkpoint.latest_checkpoint(save_dir, flag="--input")
    else:
        path = Path(save_dir) / checkpoint.tag_for(iteration)
        if not (path / checkpoint.META_NAME).is_file():
            held = ", ".join(p.name for _, p in checkpoint.complete_checkpoints(Path(save_dir))) or "none"
            raise ResumeError(f"--iteration {iteration}: {save_dir} holds no complete {path.name} (it holds: {held})")
    meta = checkpoint.read_meta_file(path, f"--input {save_dir}")
    where = f"--input {save_dir}: {path.name}"
    if is_universal(meta):
        raise ResumeError(f"{where} is already a universal checkpoint")
    stage = meta["layout"].get("zero_stage", 0)
    if stage == 0:
        raise ResumeError(
            f"{where} was saved at ZeRO stage 0, which keeps no optimizer partitions for DeepSpeed's universal "
            "checkpoint (its converter reads ZeRO stage 1-2 partitions): it resumes only at its own layout"
        )
    if stage not in UNIVERSAL_ZERO_STAGES:
        raise ResumeError(f"{where} was saved at ZeRO stage {stage}; converting ZeRO-3 checkpoints is not tested here")
    if "universal_checkpoint_info" not in meta:
        raise ResumeError(
            f"{where} was written before checkpoints recorded how their tensors are split; resume it at its own "
            "layout, save once, and convert that checkpoint"
        )
    _check_deepspeed_files(path, meta["layout"], where)
    return path, meta


def _check_deepspeed_files(path: Path, layout: dict, where: str) -> None:
    """ResumeError naming the first of DeepSpeed's files the layout of ``path`` calls for that is missing
    (DeepSpeed's converter infers the data-parallel size from the files it finds)."""
    model_parallel = layout.get("tensor_model_parallel_size", 1) * layout.get("pipeline_model_parallel_size", 1)
    for mp in range(model_parallel):
        if not (path / f"mp_rank_{mp:02d}_model_states.pt").is_file():
            raise ResumeError(f"{where}: mp_rank_{mp:02d}_model_states.pt is missing")
        for dp in range(layout["world_size"]):
            name = f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
            if not any(path.glob(f"*{name}")):  # bf16's are named bf16_zero_pp_rank_...
                raise ResumeError(f"{where}: {name} is missing")


def convert(save_dir: str, iteration: int | None, output: str, workers: int = 1) -> str:
    """Write the universal checkpoint of ``save_dir``'s checkpoint ``iteration`` (default: the latest) to
    ``output`` (whole or not at all); returns a line describing it."""
    path, meta = source_checkpoint(save_dir, iteration)
    tag = path.name

    def fill(out: Path) -> None:
        _run_deepspeed_converter(path, out / tag, workers)
        universal = {**meta, "universal": {"from": str(path.resolve()), "layout": meta["layout"]}}
        (out / tag / checkpoint.META_NAME).write_text(json.dumps(universal, indent=1))
        if (path / "rng").is_dir():
            shutil.copytree(path / "rng", out / tag / "rng")
        for name in (checkpoint.LATEST, LATEST_UNIVERSAL):
            (out / name).write_text(tag)

    write_directory_atomically(output, fill)
    layout = meta["layout"]
    return (
        f"wrote universal checkpoint {output}/{tag} (iteration {meta['iteration']}, saved at TP "
        f"{layout.get('tensor_model_parallel_size', 1)} x PP {layout.get('pipeline_model_parallel_size', 1)} x DP "
        f"{layout['world_size']}, ZeRO stage {layout['zero_stage']}); resume at any layout with --load {output} "
        "--universal-checkpoint"
    )


def _run_deepspeed_converter(source: Path, target: Path, workers: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # the flags of DeepSpeed's command line, ``python -m deepspeed.checkpoint.ds_to_universal``
    args = SimpleNamespace(
        input_folder=str(source), output_folder=str(target), num_extract_workers=workers,
        num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=False,
    )  # fmt: skip
    try:
        ds_to_universal.main(args)
    except (AssertionError, RuntimeError, KeyError) as e:  # its checks are asserts
        raise ResumeError(f"--input {source.parent}: DeepSpeed's converter failed on {source.name}: {e}") from None
