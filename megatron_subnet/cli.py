"""What every command-line entry point does with bad input: one ``error:`` line on stderr and a non-zero exit.

- ``ArgumentParser`` reports a bad flag as one line (argparse prints the usage block too);
- ``finite_float``, ``positive_int``, ``nonnegative_int``, ``fraction`` are argparse types that name the flag
  through argparse's own message (NaN and infinity are never a valid value);
- ``run_main`` calls a tool's ``main`` and turns the errors users cause (``ValueError``, ``OSError``), Ctrl-C
  (exit 130) and a closed output pipe into one line each. ``MEGATRON_SUBNET_TRACEBACK=1`` shows the traceback.
  Under a launcher an error every rank finds alike (``same_on_every_rank``) is printed once, by rank 0; every
  rank still exits with its code.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import signal
import sys
import time
from collections.abc import Callable

TRACEBACK_ENV = "MEGATRON_SUBNET_TRACEBACK"
EXIT_INTERRUPTED = 130


def launched_rank() -> int:
    """This process's rank under a launcher (torchrun or deepspeed, Open MPI, MPICH / PMIx), else 0."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# How long a rank other than 0 holds back an error every rank finds alike: the launcher ends the job (and this
# rank) once rank 0 has reported it; a rank still running after that says it itself.
HOLD_BACK_S = 5.0


def same_on_every_rank(error: BaseException) -> BaseException:
    """Mark ``error`` as one every rank of a job finds alike (a check of flags and shared files)."""
    error.same_on_every_rank = True
    return error


class ArgumentError(ValueError):
    """A flag (or a key of a config file it names) with a bad value; the message names it."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


def report(error: BaseException, code: int) -> None:
    """Print ``error: ...`` on stderr for a process about to exit with ``code``. An error every rank finds alike
    (its class or the instance says ``same_on_every_rank``) is printed by rank 0; the other ranks wait for the
    launcher to end the job (and then exit with ``code`` too), and print it only if it does not (rank 0 did
    not stop the same way)."""
    if getattr(error, "same_on_every_rank", False) and launched_rank() != 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
        time.sleep(HOLD_BACK_S)
    print(f"error: {one_line(error)}", file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: argument --lr: ...``) and exit code 2 (printed by rank 0 alone
    under a launcher: every rank parses the same flags)."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse's hook
        report(same_on_every_rank(ValueError(message)), 2)
        sys.exit(2)


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def fraction(text: str) -> float:
    """A finite float in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1]")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1, "at least 1")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, ">= 0")


def resolve_device(device: str, flag: str = "--device") -> str:
    """``device`` if this machine has it; ValueError naming the flag otherwise."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{flag} {device}: not a device (expected cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: this machine has no CUDA device; use {flag} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif parsed.type != "cpu":
        raise ValueError(f"{flag} {device}: unsupported device type {parsed.type!r} (cpu or cuda)")
    return device


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its type's name when it has none)."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text or type(error).__name__


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None, error_code: int = 2) -> int:
    """``main(argv)``; a ValueError/OSError becomes one ``error:`` line and ``error_code``, Ctrl-C exit 130."""
    try:
        code = main(argv)
        if code == 0:  # at interpreter exit, after whatever the caller still does with the group
            atexit.register(_leave_process_group)
        else:
            _exit_if_in_process_group(code)
        return code
    except KeyboardInterrupt:
        print(
            "error: interrupted (Ctrl-C); finished outputs are intact, unfinished ones were not written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout went away (`| head`): nothing to report on it; keep Python from complaining at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as e:
        if os.environ.get(TRACEBACK_ENV):
            raise
        report(e, error_code)
        _exit_if_in_process_group(error_code)
        return error_code


def _exit_if_in_process_group(code: int) -> None:
    """Exit with ``code`` at once when this process is one rank of several. A failed rank cannot wait for its
    peers, and the interpreter's own teardown with the group's threads still running aborts now and then
    (``terminate called without an active exception``, exit 134 in place of ``code``). The ``finally`` blocks
    of ``main`` have run; only the standard streams still hold output. A group of one (an in-process caller
    of ``main``) returns the code."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _leave_process_group() -> None:
    """After a successful distributed run: wait for every rank, then close the group. A rank that exits while a
    peer still reads its last message resets the connection, and gloo aborts the peer."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
