"""A run's DeepSpeed JSON config, read and checked before any work (its keys reconciled with the flags:
``config.reconcile_ds_config``)."""

from __future__ import annotations

import json
import math

from megatron_subnet.cli import ArgumentError


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
            raise ArgumentError(f'{where}: {key} must be an object like {{"enabled": true}}, got {section!r}')
        if "enabled" in section and not isinstance(section["enabled"], bool):
            raise ArgumentError(f"{where}: {key}.enabled must be true or false, got {section['enabled']!r}")
    if config.get("fp16", {}).get("enabled"):
        raise ArgumentError(
            f"{where}: fp16 is not supported (DeepSpeed's fp16 mode does not run on CPUs, and bf16 needs no loss "
            "scaling); use bf16"
        )
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
        raise ArgumentError(f"{where}: zero_optimization.{key}: {first['msg']} (got {first.get('input')!r})") from None
