"""Distributed start-up for the deepspeed, torchrun and mpirun launchers; seeds; parallel state."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_subnet.parallel import state


def initialize_distributed(backend: str | None = None, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> str:
    """Join the process group (ranks from torchrun/deepspeed env, or from MPI through mpi4py); returns the device.

    nccl when CUDA is present, gloo otherwise.
    """
    import deepspeed

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ and not _in_mpi():
            # A plain `python pretrain_slm.py`: a world of one.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT to its argument (default 29500, torchrun's
        # default too): honour a MASTER_PORT the user exported (mpirun -x MASTER_PORT) so jobs can share a node.
        port = int(os.environ.get("MASTER_PORT", 29500))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, distributed_port=port, verbose=False)
    state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def _in_mpi() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int) -> None:
    """The same seed on every rank: model init and data order agree across replicas."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
