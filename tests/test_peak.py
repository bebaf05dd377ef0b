"""Peak FLOP/s for MFU (training/peak.py): the GPU table, the cached CPU matmul probe, the bf16 report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_subnet.cache import CACHE_ENV
from megatron_subnet.training import peak

N = 256  # a small probe: fast tests


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty cache directory of its own (never the user's)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / peak.CACHE_FILE


def no_timing(*args, **kwargs):
    raise AssertionError("the probe ran a matmul where the cache should have answered")


def test_probe_measures_and_keeps_the_best_rate_seen(cache, monkeypatch):
    """A probe measured under load is replaced by a faster later one; a slower later one keeps the cached best."""
    threads = torch.get_num_threads()
    flops, source = peak.peak_flops("cpu", torch.float32, probe_size=N)
    assert math.isfinite(flops) and flops > 0
    assert source == f"probe: {N}x{N} fp32 matmul, {threads} thread{'s' * (threads != 1)}, cached {cache}"
    assert list(json.loads(cache.read_text()).values()) == [flops]
    monkeypatch.setattr(peak, "_matmul_rate", lambda device, dtype, n: flops / 2)  # a busy machine
    again, source = peak.peak_flops("cpu", torch.float32, probe_size=N)
    assert again == flops and "best seen on this host" in source
    monkeypatch.setattr(peak, "_matmul_rate", lambda device, dtype, n: flops * 3)  # a quiet one
    assert peak.peak_flops("cpu", torch.float32, probe_size=N)[0] == flops * 3
    assert list(json.loads(cache.read_text()).values()) == [flops * 3]


def test_override_wins(monkeypatch):
    monkeypatch.setattr(peak, "_matmul_rate", no_timing)
    assert peak.peak_flops("cpu", torch.bfloat16, override_tflops=12.5) == (12.5e12, "--peak-tflops")
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="--peak-tflops"):
            peak.peak_flops("cpu", torch.float32, override_tflops=bad)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"x": "fast"}', b"\xff\xfe not utf-8", b""])
def test_corrupt_cache_is_replaced(cache, content):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    flops, source = peak.peak_flops("cpu", torch.float32, probe_size=N)
    assert flops > 0 and source.endswith(f"cached {cache}")
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [flops]  # the bad entry of '{"x": "fast"}' is dropped too


def test_bad_entry_is_measured_again(cache, monkeypatch):
    key = peak.cache_key(torch.device("cpu"), torch.float32, N, torch.get_num_threads())
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({key: -3.0}))
    monkeypatch.setattr(peak, "_matmul_rate", lambda device, dtype, n: 7e9)
    assert peak.peak_flops("cpu", torch.float32, probe_size=N)[0] == 7e9
    assert json.loads(cache.read_text()) == {key: 7e9}


def test_unwritable_cache_is_no_crash(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))  # its parent is a file
    flops, source = peak.peak_flops("cpu", torch.float32, probe_size=N)
    assert flops > 0 and "not cached" in source


def test_keys_separate_dtypes_and_threads(cache, monkeypatch):
    calls = []

    def fake_rate(device, dtype, n):  # every later probe measures less: what is returned is the cached best
        calls.append((dtype, torch.get_num_threads()))
        return 1e9 * len(calls) if len(calls) <= 3 else 1.0

    monkeypatch.setattr(peak, "_matmul_rate", fake_rate)
    threads = torch.get_num_threads()
    try:
        fp32 = peak.peak_flops("cpu", torch.float32, probe_size=N)[0]
        bf16 = peak.peak_flops("cpu", torch.bfloat16, probe_size=N)[0]
        torch.set_num_threads(threads + 1)
        more_threads = peak.peak_flops("cpu", torch.float32, probe_size=N)[0]
    finally:
        torch.set_num_threads(threads)
    assert (fp32, bf16, more_threads) == (1e9, 2e9, 3e9)
    assert calls == [(torch.float32, threads), (torch.bfloat16, threads), (torch.float32, threads + 1)]
    assert peak.peak_flops("cpu", torch.bfloat16, probe_size=N)[0] == 2e9  # each read back from its own key
    assert peak.peak_flops("cpu", torch.float32, probe_size=N)[0] == 1e9
    calls.clear()
    assert peak.peak_flops("cpu", torch.float32, probe_size=2 * N)[0] == 1e9  # and the probe size
    assert len(json.loads(cache.read_text())) == 4
    key = peak.cache_key(torch.device("cpu"), torch.float32, N, threads)
    assert "fp32" in key and f"threads={threads}" in key


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", ("H100", 989.4)),
        ("NVIDIA H100 80GB HBM3", "fp32", ("H100", 66.9)),
        ("NVIDIA H100 SXM5 80GB", "tf32", ("H100 SXM", 494.7)),
        ("NVIDIA H100 PCIe", "bf16", ("H100 PCIe", 756.0)),  # the longest match, not "H100"
        ("NVIDIA H100 PCIe", "fp32", ("H100 PCIe", 51.2)),
        ("NVIDIA H200", "bf16", ("H200", 989.4)),
        ("NVIDIA H200 NVL", "bf16", ("H200 NVL", 835.5)),  # not the SXM part's 989.4
        ("NVIDIA H100 NVL", "tf32", ("H100 NVL", 417.5)),
        ("NVIDIA A100-SXM4-80GB", "bf16", ("A100", 312.0)),
        ("NVIDIA A100 80GB PCIe", "fp32", ("A100", 19.5)),
        ("NVIDIA A100-SXM4-40GB", "tf32", ("A100", 156.0)),
        ("NVIDIA GeForce RTX 3090", "bf16", None),
        ("NVIDIA A100-SXM4-80GB", "fp8", None),
    ],
)
def test_gpu_table(name, precision, expected):
    assert peak.gpu_peak_tflops(name, precision) == expected


def test_precision_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert peak.precision_name(torch.bfloat16, cpu) == "bf16"
    assert peak.precision_name(torch.float32, cpu) == "fp32"
    assert peak.precision_name(torch.float32, cuda) == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    with pytest.raises(ValueError, match="unsupported dtype"):
        peak.precision_name(torch.int8, cpu)


def test_cuda_uses_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(peak, "_matmul_rate", no_timing)
    assert peak.peak_flops("cuda", torch.bfloat16) == (989.4e12, "table: NVIDIA H200 bf16")


def test_cuda_unknown_gpu_falls_back_to_the_probe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    seen = []
    monkeypatch.setattr(peak, "_matmul_rate", lambda device, dtype, n: seen.append(device.type) or 5e13)
    flops, source = peak.peak_flops("cuda", torch.bfloat16, probe_size=N)
    assert (flops, seen) == (5e13, ["cuda"])
    assert source.startswith(f"probe: {N}x{N} bf16 matmul, Some Future GPU, cached ")


def test_cpu_bf16_report_real_probe():
    line = peak.cpu_bf16_report(probe_size=N)
    assert line is not None and "bf16 matmul" in line and "x fp32 (" in line and "GFLOP/s)" in line


@pytest.mark.parametrize(
    "flags, bf16, expected",
    [
        ({"avx2", "amx_bf16", "avx512_bf16"}, 665e9,
         "CPU has amx_bf16, avx512_bf16: bf16 matmul 3.5x fp32 (665 vs 190 GFLOP/s)"),
        ({"avx2"}, 13e9, "this CPU has no bf16 units (no amx_bf16/avx512_bf16): bf16 matmul runs at 0.068x fp32 "
                         "(13 vs 190 GFLOP/s); fp32 matmuls are faster here"),
        ({"avx512_bf16"}, 95e9, "CPU has avx512_bf16, but bf16 matmul runs at 0.5x fp32 (95 vs 190 GFLOP/s); "
                                "fp32 matmuls are faster here"),
        (None, 380e9, "CPU flags unknown (/proc/cpuinfo): bf16 matmul 2x fp32 (380 vs 190 GFLOP/s)"),
    ],
)  # fmt: skip
def test_cpu_bf16_report(monkeypatch, flags, bf16, expected):
    monkeypatch.setattr(peak, "cpu_flags", lambda: flags)
    monkeypatch.setattr(peak, "_matmul_rate", lambda device, dtype, n: bf16 if dtype == torch.bfloat16 else 190e9)
    assert peak.cpu_bf16_report(probe_size=N) == expected


def test_cpuinfo_parsing(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx512_bf16\n\nprocessor\t: 1\nflags: x\n")
    monkeypatch.setattr(peak, "CPUINFO", str(info))
    assert peak.cpu_flags() == {"fpu", "avx512_bf16"}
    assert "Test CPU" in peak.cache_key(torch.device("cpu"), torch.float32, N, 1)
    monkeypatch.setattr(peak, "CPUINFO", str(tmp_path / "missing"))
    assert peak.cpu_flags() is None
