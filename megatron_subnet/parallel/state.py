"""Process groups of the tensor-, pipeline- and data-parallel dimensions, and every rank query.

Ranks are laid out as Megatron-LM lays them out: tensor-parallel neighbours are adjacent, then data
parallel, then pipeline stages outermost::

    global rank = tp_rank + TP * (dp_rank + DP * pp_rank),   world = TP * DP * PP

So on a node of 8 GPUs with TP=2 the two halves of every layer talk over the fastest links. The
"model-parallel" group of DeepSpeed's ``mpu`` interface is one data-parallel replica: all of its TP x PP
ranks. The embedding group joins the first and last pipeline stage (where tied embeddings live twice).

Before ``initialize_model_parallel`` (or without torch.distributed) every query answers as for a single
process: sizes 1, ranks 0, groups None, so model code runs unchanged in one process. Collectives skip
a dimension of size 1; callers never pass ``group=None`` meaning "everyone".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class ParallelStateError(ValueError):
    """A parallel layout that does not fit the world (names the flag and the sizes)."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


@dataclass(frozen=True)
class Layout:
    """Sizes of the three dimensions and this rank's coordinates in them."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    tensor_rank: int = 0
    pipeline_rank: int = 0
    data_rank: int = 0

    @staticmethod
    def of(rank: int, world: int, tensor: int, pipeline: int) -> Layout:
        """The coordinates of global ``rank`` in a world of ``world`` ranks."""
        if tensor < 1 or pipeline < 1:
            raise ParallelStateError("tensor and pipeline parallel sizes must be at least 1")
        if world % (tensor * pipeline):
            raise ParallelStateError(
                f"world size {world} is not divisible by --tensor-model-parallel-size {tensor} x "
                f"--pipeline-model-parallel-size {pipeline}"
            )
        data = world // (tensor * pipeline)
        return Layout(tensor, pipeline, data, rank % tensor, rank // (tensor * data), (rank // tensor) % data)

    def global_rank(self, tensor_rank: int, data_rank: int, pipeline_rank: int) -> int:
        return tensor_rank + self.tensor * (data_rank + self.data * pipeline_rank)


_LAYOUT = Layout()
_GROUPS: dict[str, dist.ProcessGroup | None] = {}
_RANKS: dict[str, list[int]] = {}


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
    """Create every group (collective: all ranks call it with the same sizes) after torch.distributed is up."""
    global _LAYOUT
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = Layout.of(rank, world, tensor_model_parallel_size, pipeline_model_parallel_size)
    T, D, P = layout.tensor, layout.data, layout.pipeline
    families = {
        "tensor": [[layout.global_rank(t, d, p) for t in range(T)] for p in range(P) for d in range(D)],
        "data": [[layout.global_rank(t, d, p) for d in range(D)] for p in range(P) for t in range(T)],
        "pipeline": [[layout.global_rank(t, d, p) for p in range(P)] for d in range(D) for t in range(T)],
        "model": [[layout.global_rank(t, d, p) for p in range(P) for t in range(T)] for d in range(D)],
        "embedding": [
            sorted({layout.global_rank(t, d, 0), layout.global_rank(t, d, P - 1)}) for d in range(D) for t in range(T)
        ],
    }
    _GROUPS.clear()
    _RANKS.clear()
    for name, groups in families.items():
        for ranks in groups:
            # new_group is collective over the whole world, even for ranks outside the group; singleton
            # groups are real groups too, so that no caller's group=None silently means the whole world
            group = dist.new_group(ranks)
            if rank in ranks:
                _GROUPS[name], _RANKS[name] = group, ranks
    _LAYOUT = layout


def destroy_model_parallel() -> None:
    """Forget the groups (tests that initialise several layouts in one process)."""
    global _LAYOUT
    _LAYOUT = Layout()
    _GROUPS.clear()
    _RANKS.clear()


def is_initialized() -> bool:
    """torch.distributed is up (the groups may still be the single-process defaults)."""
    return dist.is_available() and dist.is_initialized()


def layout() -> Layout:
    return _LAYOUT


def _group(name: str) -> dist.ProcessGroup | None:
    return _GROUPS.get(name)


# ----------------------------------------------------------------------------- tensor parallel


def get_tensor_model_parallel_group() -> dist.ProcessGroup | None:
    return _group("tensor")


def get_tensor_model_parallel_world_size() -> int:
    return _LAYOUT.tensor


def get_tensor_model_parallel_rank() -> int:
    return _LAYOUT.tensor_rank


def get_tensor_model_parallel_src_rank() -> int:
    """The global rank of this TP group's rank 0."""
    return _RANKS.get("tensor", [_global_rank()])[0]


# ----------------------------------------------------------------------------- pipeline parallel


def get_pipeline_model_parallel_group() -> dist.ProcessGroup | None:
    return _group("pipeline")


def get_pipeline_model_parallel_world_size() -> int:
    return _LAYOUT.pipeline


def get_pipeline_model_parallel_rank() -> int:
    return _LAYOUT.pipeline_rank


def get_pipeline_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's pipeline, first stage first."""
    return _RANKS.get("pipeline", [_global_rank()])


def is_pipeline_first_stage() -> bool:
    return _LAYOUT.pipeline_rank == 0


def is_pipeline_last_stage() -> bool:
    return _LAYOUT.pipeline_rank == _LAYOUT.pipeline - 1


def get_embedding_group() -> dist.ProcessGroup | None:
    """First and last stage of this pipeline (None with one stage)."""
    return _group("embedding")


# ----------------------------------------------------------------------------- data parallel


def get_data_parallel_group() -> dist.ProcessGroup | None:
    """This rank's data-parallel group; the whole world when no layout was initialised but
    torch.distributed is up (a plain data-parallel job)."""
    if "data" in _RANKS:
        return _group("data")
    return dist.group.WORLD if is_initialized() else None


def get_data_parallel_world_size() -> int:
    if "data" in _RANKS:
        return _LAYOUT.data
    return dist.get_world_size() if is_initialized() else 1


def get_data_parallel_rank() -> int:
    if "data" in _RANKS:
        return _LAYOUT.data_rank
    return dist.get_rank() if is_initialized() else 0


def get_data_parallel_group_ranks() -> list[int]:
    return _RANKS.get("data", list(range(get_data_parallel_world_size())))


# ----------------------------------------------------------------------------- the whole job


def _global_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_rank() -> int:
    """Global rank (0 without torch.distributed)."""
    return _global_rank()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in global rank order, on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Global rank 0's ``obj`` on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class DeepSpeedMPU:
    """The ``mpu`` that ``deepspeed.initialize(mpu=...)`` expects: ZeRO partitions and reduces over the
    data-parallel group, and the gradient norm is summed over the model-parallel (TP x PP) group with a
    replicated parameter counted once (DeepSpeed reads ``param.tensor_model_parallel``)."""

    get_tensor_model_parallel_group = staticmethod(get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(get_tensor_model_parallel_rank)
    get_tensor_model_parallel_src_rank = staticmethod(get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_world_size = staticmethod(get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(get_pipeline_model_parallel_rank)
    get_pipe_parallel_group = staticmethod(get_pipeline_model_parallel_group)
    get_data_parallel_group = staticmethod(get_data_parallel_group)
    get_data_parallel_world_size = staticmethod(get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(get_data_parallel_rank)
    get_data_parallel_group_ranks = staticmethod(get_data_parallel_group_ranks)

    @staticmethod
    def get_model_parallel_group() -> dist.ProcessGroup | None:
        return _group("model")

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return _LAYOUT.tensor * _LAYOUT.pipeline

    @staticmethod
    def get_model_parallel_rank() -> int:
        return _LAYOUT.tensor_rank + _LAYOUT.tensor * _LAYOUT.pipeline_rank


mpu = DeepSpeedMPU()
