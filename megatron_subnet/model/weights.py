"""Our model checkpoint on disk, and the one loader that builds a model from it.

    model_config.json                         the architecture (ModelConfig)
    model.safetensors                         consolidated weights, or, saved at tensor-parallel size N:
    mp_rank_00.safetensors ... mp_rank_{N-1}  one shard per TP rank (Megatron's mp_rank naming), or
    mp_rank_TT_PPP.safetensors                 one per TP rank and pipeline stage
    tokenizer files, subnet.json              as the source had them / the sub-network it was cut by

Tensor-parallel splits are plain chunks along one dimension per tensor, which the model's parameters
name (``partition_dim``, see ``parallel/layers.py``); replicated tensors are stored in every shard.
``CheckpointReader`` reads any rows and columns of a tensor in GLOBAL numbering from either layout,
touching only the bytes it needs (safetensors slices), so a rank builds its shard of a model, or of a
student cut from it, without ever holding the whole parent. ``load_model`` is the one loader: meta
device, this rank's shard materialised, names and shapes checked.

Directories are written under a temporary name and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_subnet.model.config import ConfigError, ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.shapes import check_divisible, expected_shapes, partition_dims
from megatron_subnet.outputs import write_directory_atomically
from megatron_subnet.parallel.layers import WHOLE, TPShard, select
from megatron_subnet.parallel.pipeline import PipelineStage, current_stage, split_layers, stage_of

CONFIG_NAME = "model_config.json"
WEIGHTS_NAME = "model.safetensors"
SHARD_PATTERN = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?\.safetensors")
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

# read(name, rows, cols): rows/columns (global indices, None = all) of one tensor
TensorSource = Callable[[str, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit its config."""


def shard_file(tp_rank: int, pp_rank: int | None = None) -> str:
    """Megatron's names: ``mp_rank_TT`` (tensor parallel only), ``mp_rank_TT_PPP`` with pipeline stages."""
    stage = "" if pp_rank is None else f"_{pp_rank:03d}"
    return f"mp_rank_{tp_rank:02d}{stage}.safetensors"


# ----------------------------------------------------------------------------- checks and splits


def check_state_dict(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    source: str,
    shard: TPShard = WHOLE,
    stage: PipelineStage | None = None,
) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped tensors."""
    shapes = expected_shapes(config, shard, stage)
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


def check_finite(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor``, or CheckpointError naming ``where`` (the flag and checkpoint) and the tensor when any of its
    values is NaN or infinite: a teacher or parent with one such weight would make every step non-finite."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{where}: tensor {name} holds non-finite values (NaN or Inf)")
    return tensor


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def shard_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], shard: TPShard) -> dict[str, torch.Tensor]:
    """This ``shard``'s tensors of a consolidated state dict (views where possible)."""
    check_divisible(config, shard.size)
    dims = partition_dims(config)
    return {
        name: t if dims.get(name) is None or shard.size == 1 else t.chunk(shard.size, dims[name])[shard.rank]
        for name, t in state.items()
    }


def merge_state_dicts(config: ModelConfig, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The consolidated state dict of ``shards`` (TP ranks in order)."""
    if len(shards) == 1:
        return dict(shards[0])
    dims = partition_dims(config)
    return {
        name: shards[0][name] if dims.get(name) is None else torch.cat([s[name] for s in shards], dims[name])
        for name in shards[0]
    }


# ----------------------------------------------------------------------------- reading


def _weight_files(directory: Path) -> tuple[dict[tuple[int, int], Path], int, int]:
    """({(tp rank, pp rank): file}, tensor-parallel size, pipeline-parallel size) of the saved weights."""
    consolidated = directory / WEIGHTS_NAME
    shards = {}
    for path in directory.iterdir() if directory.is_dir() else []:
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            shards[(int(match.group(1)), int(match.group(2) or 0))] = path
    if consolidated.is_file() and shards:
        raise CheckpointError(f"{directory}: holds both {WEIGHTS_NAME} and mp_rank_* shards; keep one layout")
    if consolidated.is_file():
        return {(0, 0): consolidated}, 1, 1
    if not shards:
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: no such file (nor mp_rank_XX.safetensors shards)")
    tp, pp = max(t for t, _ in shards) + 1, max(p for _, p in shards) + 1
    missing = [shard_file(t, p if pp > 1 else None) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        raise CheckpointError(f"{directory}: shards of a {tp} x {pp} (TP x PP) layout; missing {', '.join(missing)}")
    return shards, tp, pp


def check_shards_belong_together(
    directory: Path, paths: dict[tuple[int, int], Path], metadata: dict[tuple[int, int], dict[str, str]]
) -> None:
    """CheckpointError unless every weight file's own record (written by ``save_checkpoint``) agrees: one
    checkpoint id, one TP x PP layout, and each file's ranks those its name gives; a layout recorded larger than
    the files present names the missing ones. Files without a record (older checkpoints) are taken as named."""
    first: tuple[Path, str] | None = None
    for (t, p), meta in sorted(metadata.items()):
        if "tensor_model_parallel_size" not in meta:
            continue
        tp, pp = int(meta["tensor_model_parallel_size"]), int(meta["pipeline_model_parallel_size"])
        missing = [shard_file(a, b if pp > 1 else None) for a in range(tp) for b in range(pp) if (a, b) not in paths]
        if missing:
            raise CheckpointError(f"{directory}: its weights were saved as {tp} x {pp} (TP x PP) files; missing "
                                  f"{', '.join(missing)}")  # fmt: skip
        ranks = (int(meta["tensor_model_parallel_rank"]), int(meta["pipeline_model_parallel_rank"]))
        if len(paths) != tp * pp or ranks != (t, p):
            raise CheckpointError(f"{paths[(t, p)]}: holds TP rank {ranks[0]}, PP rank {ranks[1]} of a {tp} x {pp} "
                                  "layout, not what its name and the files beside it say")  # fmt: skip
        identity = meta.get("checkpoint_id")
        if identity is not None and first is not None and identity != first[1]:
            raise CheckpointError(f"{paths[(t, p)]}: belongs to another checkpoint than {first[0].name} (saved "
                                  "separately); the shards of one model must come from one save")  # fmt: skip
        if identity is not None and first is None:
            first = (paths[(t, p)], identity)


class CheckpointReader:
    """Reads tensors (or some of their rows and columns, in global numbering) from a checkpoint directory,
    consolidated or sharded over TP x PP; ``with`` closes its files."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.config = load_config(directory)
        paths, self.tp_size, self.pp_size = _weight_files(self.directory)
        self._files = {}
        try:
            for key, path in sorted(paths.items()):
                self._files[key] = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None
        check_shards_belong_together(self.directory, paths, {key: f.metadata() or {} for key, f in self._files.items()})
        try:
            self.dims = partition_dims(self.config)
            check_divisible(self.config, self.tp_size)
        except ValueError as e:
            raise CheckpointError(f"{self.directory}: {e}") from None
        self.stage_of: dict[str, int] = {}  # the (first) pipeline stage whose files hold each tensor
        for p in range(self.pp_size):
            names = set(self._files[(0, p)].keys())
            for t in range(1, self.tp_size):
                if set(self._files[(t, p)].keys()) != names:
                    raise CheckpointError(f"{paths[(t, p)]}: holds other tensors than {paths[(0, p)].name}")
            for name in names:
                self.stage_of.setdefault(name, p)
        shapes = {}
        for name, p in self.stage_of.items():
            shape = list(self._files[(0, p)].get_slice(name).get_shape())
            if self.dims.get(name) is not None:
                shape[self.dims[name]] *= self.tp_size
            shapes[name] = tuple(shape)
        state = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
        check_state_dict(self.config, state, str(self.directory))
        self.shapes = shapes

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            if hasattr(f, "__exit__"):
                f.__exit__(None, None, None)
        self._files = {}

    def _slice(self, name: str, tp_rank: int = 0):
        return self._files[(tp_rank, self.stage_of[name])].get_slice(name)

    def read(self, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor[rows][:, cols]`` in global numbering (``None``: all), reading only the covering ranges."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.directory}: no tensor {name}")
        dim = self.dims.get(name) if self.tp_size > 1 else None
        index = [rows, cols][: len(self.shapes[name])]
        if dim is None:
            return _read_ranges(self._slice(name), index)
        per_rank = self.shapes[name][dim] // self.tp_size
        wanted = index[dim] if index[dim] is not None else torch.arange(self.shapes[name][dim])
        order = torch.argsort(wanted, stable=True)
        ascending = wanted[order]
        owner = ascending.div(per_rank, rounding_mode="floor")
        parts = []
        for rank in owner.unique_consecutive().tolist():
            local = list(index)
            local[dim] = ascending[owner == rank] - rank * per_rank
            parts.append(_read_ranges(self._slice(name, rank), local))
        out = torch.cat(parts, dim) if parts else _read_ranges(self._slice(name), index)
        return out if torch.equal(order, torch.arange(len(order))) else out.index_select(dim, torch.argsort(order))

    def read_shard(self, shard: TPShard, stage: PipelineStage | None = None) -> dict[str, torch.Tensor]:
        """Every tensor a model of tensor-parallel ``shard`` and pipeline ``stage`` (default: whole) holds."""
        try:
            expected = expected_shapes(self.config, shard, stage)
        except ValueError as e:
            raise CheckpointError(f"{self.directory}: {e}") from None
        out = {}
        for name, shape in expected.items():
            dim = self.dims.get(name)
            if self.tp_size == shard.size:
                out[name] = self._files[(shard.rank, self.stage_of[name])].get_tensor(name)
            elif dim is None or shard.size == 1:
                out[name] = self.read(name)
            else:
                chunk = torch.arange(shard.rank * shape[dim], (shard.rank + 1) * shape[dim])
                out[name] = self.read(name, *(chunk, None) if dim == 0 else (None, chunk))
        return out

    def read_all(self) -> dict[str, torch.Tensor]:
        """The consolidated state dict."""
        return self.read_shard(WHOLE)


def _read_ranges(slice_, index: list[torch.Tensor | None]) -> torch.Tensor:
    """Read the covering range of each indexed dimension of a safetensors slice, then pick the indices."""
    ranges = []
    for idx in index:
        ranges.append(slice(None) if idx is None or idx.numel() == 0 else slice(int(idx.min()), int(idx.max()) + 1))
    empty = [d for d, idx in enumerate(index) if idx is not None and idx.numel() == 0]
    if empty:
        shape = list(slice_.get_shape())
        for d in empty:
            shape[d] = 0
        return torch.empty(shape, dtype=_dtype(slice_.get_dtype()))
    tensor = slice_[tuple(ranges)] if ranges else slice_[:]
    for d, idx in enumerate(index):
        if idx is not None:
            offset = ranges[d].start or 0
            if not (idx.numel() == tensor.shape[d] and torch.equal(idx - offset, torch.arange(tensor.shape[d]))):
                tensor = tensor.index_select(d, idx - offset)
    return tensor.contiguous()


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    return _DTYPES.get(name, torch.float32)


def state_source(state: dict[str, torch.Tensor]) -> TensorSource:
    """``read(name, rows, cols)`` over an in-memory consolidated state dict."""
    return lambda name, rows, cols: select(state[name], rows, cols)


# ----------------------------------------------------------------------------- writing


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
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> None:
    """Write config, weights (consolidated, or one file per TP rank and pipeline stage, the layers split
    evenly over the stages), the tokenizer's files and optionally the sub-network it came from; ``state``
    is consolidated."""
    check_state_dict(config, state, str(directory))
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    try:
        counts = split_layers(config.num_layers, pp)
        files = {}
        for t in range(tp):
            shard = shard_state_dict(config, state, TPShard(t, tp))
            for p in range(pp):
                names = expected_shapes(config, TPShard(t, tp), stage_of(counts, p))
                files[(t, p)] = {name: shard[name] for name in names}
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None

    identity = uuid.uuid4().hex  # every file of this save says so: a reader refuses shards of two checkpoints

    def fill(tmp: Path) -> None:
        config.save(tmp / CONFIG_NAME)
        for (t, p), tensors in files.items():
            name = WEIGHTS_NAME if tp == pp == 1 else shard_file(t, p if pp > 1 else None)
            meta = {"format": "pt", "tensor_model_parallel_size": str(tp), "tensor_model_parallel_rank": str(t),
                    "pipeline_model_parallel_size": str(pp), "pipeline_model_parallel_rank": str(p),
                    "checkpoint_id": identity}  # fmt: skip
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name, metadata=meta)
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


def checkpoint_layout(directory: str | os.PathLike) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) a checkpoint's weights were saved at ((1, 1): consolidated)."""
    _, tp, pp = _weight_files(Path(directory))
    return tp, pp


def load_checkpoint(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and consolidated weights of a checkpoint (shards merged), checked against each other."""
    with CheckpointReader(directory) as reader:
        return reader.config, reader.read_all()


def model_from_state(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    shard: TPShard | None = None,
    stage: PipelineStage | None = None,
):
    """A GPTModel of tensor-parallel ``shard`` and pipeline ``stage`` holding ``state`` (exactly that
    part's tensors; no copy on CPU), in eval mode."""
    with torch.device("meta"):
        model = GPTModel(config, shard, stage)
    check_state_dict(config, state, "weights", model.shard, model.stage)
    marks = {n: {k: v for k, v in vars(p).items() if k in _PARAM_MARKS} for n, p in model.named_parameters()}
    model.load_state_dict(state, assign=True)  # new Parameter objects: their marks are set again
    for name, param in model.named_parameters():
        for key, value in marks.get(name, {}).items():
            setattr(param, key, value)
    return model.to(device).eval()


# what parameters carry for DeepSpeed and the converters: tensor-parallel split, pipeline-replicated copy
_PARAM_MARKS = ("tensor_model_parallel", "partition_dim", "partition_stride", "ds_pipe_replicated")


def load_model(
    directory: str | os.PathLike,
    device: torch.device | str = "cpu",
    shard: TPShard | None = None,
    stage: PipelineStage | None = None,
):
    """The one loader: a GPTModel of this rank's tensor-parallel ``shard`` and pipeline ``stage`` (defaults:
    its place in the TP group, and its stage of the model's layers split evenly), built on the meta device,
    with only that part's weights read from the checkpoint (any saved layout); eval mode."""
    shard = shard or TPShard.current()
    with CheckpointReader(directory) as reader:
        stage = stage or current_stage(reader.config.num_layers)
        state = reader.read_shard(shard, stage)
        return model_from_state(reader.config, state, device, shard, stage)
