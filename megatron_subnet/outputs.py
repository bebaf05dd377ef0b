"""Outputs that appear whole or not at all, never replace what the user did not ask to lose, and leave no orphans.

The rules every tool follows (README, "Error contract"):

- an output that exists is replaced only with ``--overwrite`` (appending to a log, or resuming a run that the
  output holds, is not replacing);
- no output may contain, or lie inside, one of the tool's inputs (``--overwrite`` does not lift this);
- where an output goes is checked before any expensive work: a file where a directory is wanted (or the
  reverse), a parent that is a file, a directory that cannot be written;
- files and directories are built under a temporary sibling ``.NAME.tmp-HOST-PID-RANDOM`` and renamed into
  place; the next write of the same output removes temporaries whose process (on this host) is gone, and
  names any other leftover it cannot vouch for.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

_HOST = socket.gethostname().replace("/", "_") or "host"
_MARKERS = ("tmp", "old")


class OutputError(ValueError):
    """An output location that cannot or may not be written; the message names the flag."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


# ----------------------------------------------------------------------------- temporaries


def temp_sibling(path: str | os.PathLike, marker: str = "tmp") -> Path:
    """A fresh hidden name beside ``path`` that identifies this process: ``.NAME.tmp-HOST-PID-RANDOM``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{marker}-{_HOST}-{os.getpid()}-{secrets.token_hex(3)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """(temporaries of ``path`` whose process on this host is gone, other temporary-looking siblings)."""
    stale, unknown = [], []
    parent = path.parent
    if not parent.is_dir():
        return stale, unknown
    ours = [f".{path.name}.{m}-" for m in _MARKERS]
    legacy = (f"{path.name}.tmp", f".{path.name}.tmp", f".{path.name}.old")  # names used by older releases
    for sibling in parent.iterdir():
        name = sibling.name
        prefix = next((p for p in ours if name.startswith(p)), None)
        if prefix is not None:
            host, _, rest = name[len(prefix) :].rpartition("-")[0].rpartition("-")
            if host == _HOST and rest.isdigit():
                if int(rest) != os.getpid() and not _pid_alive(int(rest)):
                    stale.append(sibling)
                continue
            unknown.append(sibling)
        elif name.startswith(legacy):
            tail = name.rsplit("-", 1)[-1] if "-" in name else name.rsplit("tmp", 1)[-1]
            if tail.isdigit() and not _pid_alive(int(tail)):
                stale.append(sibling)
            elif not (tail.isdigit() and int(tail) == os.getpid()):
                unknown.append(sibling)
    return stale, unknown


def remove_stale_temps(path: str | os.PathLike, quiet: bool = False) -> list[Path]:
    """Delete the temporaries an interrupted write of ``path`` left (their process is gone); returns them.

    Temporary-looking siblings this host cannot vouch for (another host's, or an older naming) are named on
    stderr and kept.
    """
    stale, unknown = _leftovers(Path(path))
    for leftover in stale:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        if not quiet:
            print(f"removed {leftover}: left by an interrupted run", file=sys.stderr)
    for leftover in unknown:
        if not quiet:
            print(f"note: {leftover} looks like a leftover of an interrupted write; delete it if no run "
                  "is writing there", file=sys.stderr)
    return stale


def write_file_atomically(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """``fill(tmp)`` writes the file, which is then renamed to ``path`` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_sibling(path)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def _apply_umask(root: Path) -> None:
    """Give ``root`` and its files the modes a plain mkdir/open would (mkdtemp and safetensors use 0o700/0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_directory_atomically(directory: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """``fill(tmp_dir)`` writes the directory, which then replaces ``directory``.

    Callers decide beforehand (``check_output``) whether an existing ``directory`` may be replaced.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory)
    tmp = temp_sibling(directory)
    tmp.mkdir()
    try:
        fill(tmp)
        _apply_umask(tmp)
        if directory.exists():
            old = temp_sibling(directory, "old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- checks before the work


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_nested(output: str | os.PathLike, flag: str, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """OutputError when ``output`` contains, equals or lies inside one of ``inputs`` (``{flag: path}``)."""
    out = Path(output).resolve()
    for input_flag, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        if _is_within(src, out):
            what = "is" if src == out else "contains"
            raise OutputError(f"{flag} {output}: {what} the input {input_flag} {path}; write somewhere else")
        if _is_within(out, src):
            raise OutputError(f"{flag} {output}: lies inside the input {input_flag} {path}; write somewhere else")


def check_writable_location(path: str | os.PathLike, flag: str, kind: str = "file") -> None:
    """OutputError unless ``path`` can be created (missing parents included) or replaced as a ``kind``
    (``"file"`` or ``"dir"``)."""
    path = Path(path)
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise OutputError(f"{flag} {path}: exists and is not a directory")
        if kind == "file" and path.is_dir():
            raise OutputError(f"{flag} {path}: is a directory, expected a file path")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {path}: {ancestor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {ancestor} ({e.strerror or e})") from None


def check_output(
    path: str | os.PathLike,
    flag: str,
    kind: str = "file",
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    overwrite_flag: str = "--overwrite",
) -> None:
    """Everything that can be known about writing ``path`` before the work starts (see the module docstring).

    ``kind``: ``"file"``, ``"dir"`` (replaced as a whole), or ``"append"`` (a file that is added to).
    """
    path = Path(path)
    check_writable_location(path, flag, "dir" if kind == "dir" else "file")
    check_not_nested(path, flag, inputs or {})
    if kind == "append" or overwrite or not path.exists():
        return
    if kind == "dir" and not any(path.iterdir()):
        return
    what = "exists and is not empty" if kind == "dir" else "exists"
    raise OutputError(f"{flag} {path}: {what} (pass {overwrite_flag} to replace it)")
