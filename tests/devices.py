"""CUDA's device rules, checked on a CPU-only machine.

A CUDA kernel refuses operands on two devices ("indices must be on the current device", "Expected all tensors
to be on the same device"), and a host sync of a GPU tensor (``.item()``) stalls it. On the CPU every tensor
lives on one device, so neither mistake shows. Run the code on the ``meta`` device under ``one_device()``: an
operation whose tensor operands lie on two devices raises, and ``.item()`` of a meta tensor raises too.
Where code cannot run on ``meta`` (a DeepSpeed engine), ``host_reads()`` lists where our code reads a tensor
on the host.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MixedDevices(AssertionError):
    pass


class one_device(TorchDispatchMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Every operation's tensor operands lie on one device (CPU scalars excepted, as CUDA allows them)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise MixedDevices(f"{func}: operands on {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}  # fmt: skip
_PACKAGE = str(Path(__file__).resolve().parents[1] / "megatron_subnet")


class host_reads(TorchFunctionMode):  # noqa: N801 - a context manager
    """Records each place in ``megatron_subnet/`` that reads a tensor's value on the host (``.item()``,
    ``.tolist()``, ``bool()``, ``float()``, ...): on a GPU each one waits for the device to finish. Reads made
    inside torch or DeepSpeed on our behalf are theirs, not counted. ``sites``: ``"file:line method"``."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            frame = inspect.currentframe().f_back
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
                where = os.path.relpath(frame.f_code.co_filename, Path(_PACKAGE).parent)
                self.sites.append(f"{where}:{frame.f_lineno} {func.__name__}")
        return func(*args, **(kwargs or {}))
