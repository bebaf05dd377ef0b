"""Distributed start-up on a GPU node, without one: each rank's CUDA device is chosen from its launcher's
local rank and made current before the process group exists (NCCL binds a communicator to the current
device)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_subnet import initialize
from megatron_subnet.parallel import state


@pytest.mark.parametrize(
    "launcher_env, deepspeed_comm",
    [({"LOCAL_RANK": "1"}, True), ({"LOCAL_RANK": "1"}, False), ({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}, False)],
)
def test_cuda_device_is_set_before_the_process_group(monkeypatch, launcher_env, deepspeed_comm):
    import deepspeed

    calls = []
    for key in ("RANK", "MASTER_ADDR", *initialize._LOCAL_RANK_ENV, *initialize._MPI_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for key, value in launcher_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, **_: calls.append(("init", dist_backend)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    monkeypatch.setattr(state, "initialize_model_parallel", lambda *_: calls.append(("groups",)))
    device = initialize.initialize_distributed(device="cuda", deepspeed_comm=deepspeed_comm)
    assert device == "cuda:1"
    assert calls == [("set_device", 1), ("init", "nccl"), ("groups",)]


def test_a_local_rank_only_mpi_discovery_tells_moves_the_rank_to_its_gpu(monkeypatch):
    """Under an MPI launcher whose local rank we cannot read, DeepSpeed's discovery sets LOCAL_RANK: the rank
    moves to that GPU right after, instead of staying on cuda:0."""
    import deepspeed

    calls = []
    for key in ("RANK", "MASTER_ADDR", *initialize._LOCAL_RANK_ENV, *initialize._MPI_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PMIX_RANK", "3")

    def discovery(dist_backend, **_):
        monkeypatch.setenv("LOCAL_RANK", "1")
        calls.append(("init", dist_backend))

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", discovery)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    monkeypatch.setattr(state, "initialize_model_parallel", lambda *_: None)
    assert initialize.initialize_distributed(device="cuda") == "cuda:1"
    assert calls == [("set_device", 0), ("init", "nccl"), ("set_device", 1)]


@pytest.mark.parametrize("world, expect_build", [("1", False), ("2", True)])
def test_one_cpu_process_skips_deepspeeds_shared_memory_build(monkeypatch, world, expect_build):
    """DeepSpeed compiles a shared-memory all-reduce for CPU ranks at start (20-80 s on a fresh machine): a
    world of one has nobody to reduce with and skips it; two CPU ranks keep it."""
    import importlib

    import deepspeed

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    built = []
    monkeypatch.setattr(ds_torch, "build_shm_op", lambda: built.append(1))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **_: ds_torch.build_shm_op())
    monkeypatch.setenv("WORLD_SIZE", world)
    initialize._init_deepspeed_comm("gloo", use_cuda=False)
    assert bool(built) == expect_build
