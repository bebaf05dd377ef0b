"""benchmarks/gpu_check.sh, the GPU machine's check, runs whole on the CPU (``--cpu``): every step, the summary
and the archive, so its wiring cannot rot between GPU sessions; and a failing step stops nothing after it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

REPO = Path(__file__).resolve().parents[1]
RUNS = ["smollm2_bf16", "smollm2_bf16_kd", "1b_bf16", "1b_bf16_kd", "1b_bf16_recompute", "smollm2_fp32", "1b_fp32"]


def gpu_check(out: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(out), *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def table_rows(summary: str, heading: str) -> list[list[str]]:
    section = summary.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines()[4:] if line.startswith("|")]  # after the header and its rule
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_every_step_runs_on_the_cpu(tmp_path):
    result = gpu_check(tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["logs.tar.gz", "summary.md"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    steps = {row[0]: row[1] for row in table_rows(summary, "## Steps")}
    assert steps == dict.fromkeys(["env", "attention", "tests", "prepare", *(f"run_{r}" for r in RUNS)], "ok")
    runs = table_rows(summary, "## Throughput")
    assert [row[0] for row in runs] == RUNS
    for name, steps_run, tokens_per_s, *_ in runs:
        assert steps_run == "4" and float(tokens_per_s.replace(",", "")) > 0, name
    attention = table_rows(summary, "## Attention kernels")
    assert attention and all("flash_attention_for_cpu" in row[2] and row[-1].endswith("ms") for row in attention)
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"logs/tests.log", "logs/steps.tsv", *(f"logs/runs/{r}.jsonl" for r in RUNS)} <= names


def test_a_failing_step_stops_nothing_and_keeps_its_output(tmp_path):
    result = gpu_check(tmp_path / "out", "--only", "tests,attention", env={"TESTS": "tests/no_such_test.py"})
    assert result.returncode == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    steps = {row[0]: row[1] for row in table_rows(summary, "## Steps")}
    assert steps["attention"] == "ok" and steps["tests"].startswith("FAILED")
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as archive:
        log = archive.extractfile("logs/tests.log").read().decode()
    assert "no_such_test.py" in log


def test_a_step_past_the_budget_is_skipped_and_said(tmp_path):
    """A step whose time limit no longer fits the check's budget (the device call's) is skipped, not started:
    the summary and the archive still come back, and say so."""
    result = gpu_check(tmp_path / "out", "--only", "env,tests", env={"BUDGET": "100"})  # env: 60 s, tests: 300 s
    assert result.returncode == 1
    steps = {row[0]: row[1] for row in table_rows((tmp_path / "out" / "summary.md").read_text(), "## Steps")}
    assert steps["env"] == "ok" and steps["tests"].startswith("SKIPPED (300s limit past the 100s budget)")
