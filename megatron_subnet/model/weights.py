"""Our model checkpoint on disk: ``model_config.json`` + ``model.safetensors`` (+ the tokenizer's files).

Directories are written under a temporary name and renamed into place, so a reader never sees half of
one. Loading checks every tensor name and shape against the config and names what does not fit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_subnet.model.config import ConfigError, ModelConfig
from megatron_subnet.outputs import write_directory_atomically

CONFIG_NAME = "model_config.json"
WEIGHTS_NAME = "model.safetensors"
SUBNET_NAME = "subnet.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit its config."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a model of ``config`` holds (built on the meta device: no memory)."""
    from megatron_subnet.model.gpt import GPTModel

    with torch.device("meta"):
        model = GPTModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped tensors."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(n for n in set(shapes) & set(state) if tuple(state[n].shape) != shapes[n])
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong:
        problems.append(
            "wrong shape "
            + ", ".join(f"{n} {tuple(state[n].shape)} != {shapes[n]}" for n in wrong[:3])
            + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else "")
        )
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the config: " + "; ".join(problems))


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def copy_tokenizer_files(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copy whatever tokenizer files ``src`` has into ``dst``; returns their names."""
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied


def save_checkpoint(
    directory: str | os.PathLike,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer_from: str | os.PathLike | None = None,
    subnet: dict | None = None,
) -> None:
    """Write config, weights (safetensors), the tokenizer's files and optionally the sub-network it came from."""
    check_state_dict(config, state, str(directory))

    def fill(tmp: Path) -> None:
        config.save(tmp / CONFIG_NAME)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS_NAME, metadata={"format": "pt"}
        )
        copy_tokenizer_files(tokenizer_from, tmp)
        if subnet is not None:
            (tmp / SUBNET_NAME).write_text(json.dumps(subnet) + "\n")

    write_directory_atomically(directory, fill)


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {CONFIG_NAME})")
    try:
        return ModelConfig.load(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_checkpoint(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights of a checkpoint, checked against each other."""
    config = load_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None
    check_state_dict(config, state, str(path))
    return config, state


def load_model(directory: str | os.PathLike, device: torch.device | str = "cpu"):
    """A GPTModel with a checkpoint's weights, in eval mode."""
    from megatron_subnet.model.gpt import GPTModel

    config, state = load_checkpoint(directory)
    with torch.device("meta"):
        model = GPTModel(config)
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()
