"""Distributed start-up for every entry point (deepspeed, torchrun, mpirun launchers or a plain process); seeds.

Rank and group queries live in ``parallel/state.py``; this module only brings the process group up.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_subnet.parallel import state

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _in_mpi() -> bool:
    return any(k in os.environ for k in _MPI_ENV)


def _launched() -> bool:
    """Started by torchrun or the deepspeed launcher (they export RANK and MASTER_ADDR)."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def initialize_distributed(
    backend: str | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    device: str | None = None,
    deepspeed_comm: bool = True,
) -> str:
    """Join the launcher's process group and build the TP/PP/DP groups; returns this rank's device.

    Ranks come from the torchrun/deepspeed environment, or from MPI (mpirun) through DeepSpeed's mpi4py
    discovery. A plain ``python`` run is a world of one. ``deepspeed_comm`` starts DeepSpeed's comm layer
    (what the training engine needs); tools without an engine use torch.distributed alone, which avoids
    DeepSpeed's one-off CPU comm-op build. ``device``: ``cpu``/``cuda`` (default: cuda when present).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--distributed-backend nccl: needs CUDA GPUs, and this machine has none; use gloo")
    device = _device(use_cuda)  # before the process group: NCCL binds each rank's communicator to its device
    if not dist.is_initialized():
        if not _launched() and not _in_mpi():
            if tensor_parallel * pipeline_parallel > 1:
                raise ValueError(
                    f"--tensor-model-parallel-size {tensor_parallel} x --pipeline-model-parallel-size "
                    f"{pipeline_parallel} needs that many processes: start it with torchrun --nproc-per-node "
                    f"{tensor_parallel * pipeline_parallel} (or deepspeed / mpirun)"
                )
            if not deepspeed_comm:
                return device  # one process, no group needed
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if deepspeed_comm or _in_mpi():
            _init_deepspeed_comm(backend, use_cuda)
            if use_cuda and f"cuda:{_local_rank()}" != device:  # a local rank only MPI discovery could tell
                device = _device(use_cuda)
        else:
            dist.init_process_group(backend)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # every rank is through the rendezvous before any may fail and exit: rank 0 hosts the store the
            # others connect through, and a rank still connecting would die with a traceback, not our one line
            dist.barrier()
    state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    return device


def _init_deepspeed_comm(backend: str, use_cuda: bool) -> None:
    import importlib

    import deepspeed

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is torch
    if not use_cuda and os.environ.get("WORLD_SIZE") == "1" and hasattr(ds_torch, "build_shm_op"):
        # DeepSpeed compiles a shared-memory all-reduce for CPU ranks at start (20-80 s on a fresh machine);
        # one process reduces with nobody: skip the build
        ds_torch.build_shm_op = lambda: None
    # Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT to its argument (default 29500, torchrun's
    # default too): honour a MASTER_PORT the user exported (mpirun -x MASTER_PORT) so jobs can share a node.
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, distributed_port=port, verbose=False)


# The rank on this node as each launcher names it: torchrun and deepspeed, Open MPI, MVAPICH, MPICH / Intel MPI,
# Slurm's srun.
_LOCAL_RANK_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                   "SLURM_LOCALID")  # fmt: skip


def _device(use_cuda: bool) -> str:
    """``cpu``, or this rank's GPU (its rank on the node), made the current CUDA device."""
    if not use_cuda:
        return "cpu"
    local_rank = _local_rank()
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def _local_rank() -> int:
    return int(next((os.environ[k] for k in _LOCAL_RANK_ENV if k in os.environ), 0))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int) -> None:
    """The same seed on every rank: model init (every TP rank draws the full tensor) and data order agree."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
