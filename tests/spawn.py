"""A minimal env:// launcher for the tests' multi-process runs: ``python tests/spawn.py N SCRIPT ARGS...``.

It starts N copies of ``python SCRIPT ARGS...`` with the variables torchrun sets for one node (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). When one worker fails,
the others are killed, as torchrun does, and it exits with the first failure's code (128 + signal for a
killed worker). It saves each job torchrun's own start-up, about 2.5 s here (its torch import and its
rendezvous), which the equivalence runs would pay some 40 times. The launchers users run (torchrun,
deepspeed, mpirun) keep their own tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from distributed import free_port  # this script's own directory is first on sys.path


def main(argv: list[str]) -> int:
    count, script, *args = argv
    world = int(count)
    port = free_port()
    workers = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        workers.append(subprocess.Popen([sys.executable, script, *args], env=env))
    code, running = 0, list(workers)
    while running:
        for worker in list(running):
            returned = worker.poll()
            if returned is None:
                continue
            running.remove(worker)
            if returned != 0 and code == 0:
                code = returned if returned > 0 else 128 - returned
                for other in running:
                    other.kill()
        time.sleep(0.05)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
