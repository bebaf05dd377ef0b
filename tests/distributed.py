"""Run a function on N gloo processes on this machine and collect what each rank returns.

    results = run_distributed(fn, world_size=4, tensor_parallel=2, args=(...))   # [rank 0's, rank 1's, ...]

``fn(rank, *args)`` runs after ``torch.distributed`` (gloo, one thread per process) and the parallel state
(``tensor_parallel`` x ``pipeline_parallel``) are up; it must be a module-level function (processes are
spawned) and return something picklable (CPU tensors are fine). A failure on any rank fails the call
with that rank's traceback; a hang fails it after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback


def free_port() -> int:
    """A TCP port free on localhost now (the one helper every multi-process test uses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tensor_parallel, pipeline_parallel, fn, args, results) -> None:
    import torch
    import torch.distributed as dist

    from megatron_subnet.parallel import state

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
        # plain pickle bytes: the queue's own pickler would share tensor storage with a process about to exit
        results.put((rank, True, pickle.dumps(fn(rank, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn, world_size: int, tensor_parallel: int = 1, pipeline_parallel: int = 1, args: tuple = (), timeout: float = 180
) -> list:
    """``[fn(rank, *args) for each rank]``, computed by ``world_size`` processes at once."""
    import torch.multiprocessing as mp  # here: tests/spawn.py imports free_port without torch

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, port, tensor_parallel, pipeline_parallel, fn, args, results)
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    except queue.Empty:
        raise AssertionError(f"timed out after {timeout}s; ranks done: {sorted(out)}") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
