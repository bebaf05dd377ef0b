"""The device's peak FLOP/s, the denominator of model FLOPs utilisation (MFU).

In order: ``--peak-tflops`` if given; on a GPU the vendor's dense (no sparsity) peak from ``GPU_PEAK_TFLOPS``;
else a measured one: the best rate of a square matmul on the device (``probe_flops``): the best ever seen
per host, device, dtype and thread count, kept in ``<cache_dir>/peak_flops.json``.

fp32 on a GPU counts as fp32 with TF32 off (PyTorch's default), i.e. the non-tensor-core peak; when the
program has turned TF32 on (``torch.backends.cuda.matmul.allow_tf32``) the TF32 peak is used.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch

from megatron_subnet.cache import cache_dir
from megatron_subnet.outputs import write_text_atomically

_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
_H100_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}  # the NVL parts (H100 and H200) run at 400 W
# Dense peaks in TFLOP/s by a substring of torch.cuda.get_device_name(); the longest matching name wins.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": _H100_SXM,
    "H100": _H100_SXM,  # "NVIDIA H100 80GB HBM3" is the SXM part
    "H200": _H100_SXM,  # "NVIDIA H200" is the SXM part
    "H100 NVL": _H100_NVL,
    "H200 NVL": _H100_NVL,
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
PRECISIONS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CACHE_FILE = "peak_flops.json"
CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def gpu_peak_tflops(name: str, precision: str) -> tuple[str, float] | None:
    """(matched table name, dense TFLOP/s) for a GPU named ``name`` in ``precision`` (bf16, fp16, tf32, fp32)."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            peak = GPU_PEAK_TFLOPS[key].get(precision)
            return None if peak is None else (key, peak)
    return None


def precision_name(dtype: torch.dtype, device: torch.device) -> str:
    """bf16, fp16, fp32, or tf32 for fp32 on a GPU with TF32 matmuls turned on."""
    if dtype not in PRECISIONS:
        raise ValueError(f"peak FLOP/s: unsupported dtype {dtype} (expected {', '.join(map(str, PRECISIONS))})")
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return PRECISIONS[dtype]


def peak_flops(
    device: torch.device | str, dtype: torch.dtype, override_tflops: float | None = None, probe_size: int = 2048
) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): ``--peak-tflops``, the GPU table, or the matmul probe."""
    if override_tflops is not None:
        if isinstance(override_tflops, bool) or not isinstance(override_tflops, int | float):
            raise ValueError(f"--peak-tflops {override_tflops!r}: must be a positive number")
        if not math.isfinite(override_tflops) or override_tflops <= 0:
            raise ValueError(f"--peak-tflops {override_tflops!r}: must be a positive number")
        return float(override_tflops) * 1e12, "--peak-tflops"
    device = torch.device(device)
    precision = precision_name(dtype, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hit = gpu_peak_tflops(name, precision)
        if hit is not None:
            return hit[1] * 1e12, f"table: {name} {precision}"
    return probe_flops(device, dtype, probe_size)


def probe_flops(device: torch.device | str, dtype: torch.dtype, n: int = 2048) -> tuple[float, str]:
    """The best rate of an ``n x n`` matmul on ``device`` ever measured on this host, and a line saying so.

    Every call measures briefly (~0.25 s) and keeps the higher of that and the cached best: a probe taken
    while other work shared the device is replaced by the next quieter one, never trusted for good."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} thread{'s' * (threads != 1)}"
    what = f"probe: {n}x{n} {precision_name(dtype, device)} matmul, {where}"
    key = cache_key(device, dtype, n, threads)
    path = cache_dir() / CACHE_FILE
    entries = _read_cache(path)
    measured = _matmul_rate(device, dtype, n)
    if measured <= entries.get(key, 0.0):
        return entries[key], f"{what}, best seen on this host (now {measured / 1e9:.0f} GFLOP/s), cache {path}"
    entries[key] = measured
    try:
        write_text_atomically(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        return measured, f"{what}, not cached ({e})"
    return measured, f"{what}, cached {path}"


def cache_key(device: torch.device, dtype: torch.dtype, n: int, threads: int) -> str:
    """Host (name and CPU model), device, dtype, matmul size and (on CPU) thread count."""
    host = f"{platform.node()} / {_cpuinfo().get('model name') or platform.processor() or platform.machine()}"
    if device.type == "cuda":
        return f"{host} | cuda {torch.cuda.get_device_name(device)} | {precision_name(dtype, device)} | n={n}"
    return f"{host} | {device.type} | {precision_name(dtype, device)} | n={n} | threads={threads}"


def cpu_bf16_report(probe_size: int = 2048) -> str | None:
    """One line on bf16 matmuls on this CPU: its bf16 units and the probe's bf16/fp32 rate; a warning when
    it has no bf16 units or bf16 is slower than fp32. None when the probe cannot run."""
    try:
        bf16, _ = probe_flops("cpu", torch.bfloat16, probe_size)
        fp32, _ = probe_flops("cpu", torch.float32, probe_size)
    except RuntimeError:
        return None
    ratio = bf16 / fp32
    rates = f"{ratio:.2g}x fp32 ({bf16 / 1e9:.0f} vs {fp32 / 1e9:.0f} GFLOP/s)"
    flags = cpu_flags()
    units = [f for f in BF16_FLAGS if flags is not None and f in flags]
    slower = "; fp32 matmuls are faster here" if ratio < 1 else ""
    if flags is not None and not units:
        return f"this CPU has no bf16 units (no {'/'.join(BF16_FLAGS)}): bf16 matmul runs at {rates}{slower}"
    has = f"CPU has {', '.join(units)}" if units else f"CPU flags unknown ({CPUINFO})"
    if ratio < 1:
        return f"{has}, but bf16 matmul runs at {rates}{slower}"
    return f"{has}: bf16 matmul {rates}"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    info = _cpuinfo()
    return set(info["flags"].split()) if "flags" in info else None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path(CPUINFO).read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def _read_cache(path: Path) -> dict[str, float]:
    """The cached rates; a missing, unreadable or corrupt file (or entry) counts as empty."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    }


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int, budget_s: float = 0.25) -> float:
    """Best FLOP/s of ``n x n @ n x n`` over timed repeats after a warm-up, about ``budget_s`` seconds in all
    (a matmul slower than the budget runs once: the warm-up's rate)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def rate() -> float:
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        return 2 * n**3 / max(time.perf_counter() - t0, 1e-9)

    start = time.perf_counter()
    warm_up = rate()
    rates = []
    while time.perf_counter() - start < budget_s:
        rates.append(rate())
    return max(rates, default=warm_up)
