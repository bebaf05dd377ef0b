"""bf16, recomputation, compilation and MFU end to end: ``pretrain_slm.py`` on 2 gloo ranks with a teacher.

- bf16 (fp32 master weights, DeepSpeed's bf16 mode) at ZeRO 0-3 tracks the fp32 run over 20 steps within
  ``BF16_REL`` relative per step, and is not the fp32 run (bf16 did run);
- a bf16 teacher beside an fp32 student (``--teacher-dtype bf16``) gives the fp32-teacher run's losses within
  the same tolerance;
- ``--recompute-granularity full`` / ``--recompute-activations`` give the plain run's losses and gradient
  norms (recomputation changes memory, not the numbers);
- every training record carries model TFLOP/s, MFU and the cumulative FLOPs, from ``model/flops.py``;
- flags that do not go together are one line each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.flops import forward_flops_per_token, training_flops_per_token
from megatron_subnet.model.subnet import SubnetConfig
from tests.training_utils import (
    GLOBAL,
    MICRO,
    SEQ,
    build_workspace,
    ok,
    python_cmd,
    run,
    run_many,
    spawn_cmd,
    train_records,
)

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

ITERS = 20
BF16_REL = 0.01  # bf16 keeps 8 bits of mantissa (0.4%); over 20 steps the losses stay within 1% of fp32's


def flags(ws: Path, ds_config: str, log_dir: Path, *extra: str) -> list[str]:
    return [
        "--ds_config", str(ws / ds_config), "--teacher-load", str(ws / "teacher"), "--subnet", str(ws / "subnet.json"),
        "--data-path", str(ws / "data"), "--split", "80,10,10", "--micro-batch-size", str(MICRO),
        "--global-batch-size", str(GLOBAL), "--seq-length", str(SEQ), "--train-iters", str(ITERS),
        "--lr", "1e-2", "--min-lr", "1e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
        "--eval-interval", str(ITERS), "--eval-iters", "1", "--log-dir", str(log_dir), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = build_workspace(tmp_path_factory.mktemp("precision"))
    for stage in range(4):
        config = {"zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "bf16": {"enabled": True}}
        (root / f"bf16_zero{stage}.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def runs(ws) -> dict[str, dict[int, dict]]:
    """Each run once: fp32 at ZeRO-0 (the reference, --peak-tflops 1), bf16 at ZeRO 0-3, an fp32 student with a
    bf16 teacher, full and selective recomputation."""
    jobs = {
        "fp32": ("zero0.json", "--peak-tflops", "1"),
        **{f"bf16_z{s}": (f"bf16_zero{s}.json", "--bf16") for s in range(4)},
        "bf16_teacher": ("zero0.json", "--teacher-dtype", "bf16"),
        "recompute_full": ("zero1.json", "--recompute-granularity", "full"),
        "recompute_selective": ("zero0.json", "--recompute-activations"),
    }
    commands = [(spawn_cmd(2, flags(ws, ds_config, ws / f"run_{name}", *extra)), ws, None, 300, None)
                for name, (ds_config, *extra) in jobs.items()]  # fmt: skip
    for result in run_many(commands):  # two at a time
        ok(result)
    return {name: train_records(ws / f"run_{name}") for name in jobs}


def relative_gaps(records: dict[int, dict], reference: dict[int, dict], key: str = "loss") -> list[float]:
    assert sorted(records) == sorted(reference) == list(range(1, ITERS + 1))
    return [abs(records[i][key] - reference[i][key]) / abs(reference[i][key]) for i in sorted(reference)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_tracks_fp32_at_every_zero_stage(runs, stage):
    """20 steps with distillation: every bf16 loss within 1% of the fp32 run's, and bf16 really ran (the
    losses are not fp32's bit for bit)."""
    gaps = relative_gaps(runs[f"bf16_z{stage}"], runs["fp32"])
    assert max(gaps) <= BF16_REL, gaps
    assert max(gaps) > 1e-6, "the bf16 run gave the fp32 losses exactly: was it bf16?"
    assert not any(r["skipped"] for r in runs[f"bf16_z{stage}"].values())


def test_bf16_teacher_beside_an_fp32_student(runs):
    """--teacher-dtype bf16: the KD part moves by bf16 rounding only; CE before the first update is fp32's."""
    records, reference = runs["bf16_teacher"], runs["fp32"]
    assert max(relative_gaps(records, reference)) <= BF16_REL
    assert max(relative_gaps(records, reference, "kd")) <= 5 * BF16_REL
    assert records[1]["ce"] == pytest.approx(reference[1]["ce"], rel=1e-6)  # the student is fp32, untouched yet
    assert records[1]["kd"] != reference[1]["kd"]  # the teacher's logits are bf16's


@pytest.mark.parametrize("name", ["recompute_full", "recompute_selective"])
def test_recomputation_changes_no_number(runs, name):
    """Recomputed activations are the same activations: losses and gradient norms of the plain run (ZeRO-1 for
    full recomputation, ZeRO-0 for selective; ZeRO stages agree with each other to 1e-6)."""
    for key in ("loss", "ce", "grad_norm"):
        assert max(relative_gaps(runs[name], runs["fp32"], key)) <= 1e-5, key


def test_every_training_record_carries_flops_and_mfu(runs, ws):
    """model_tflops = 3 x forward FLOPs x tokens/s per device; with --peak-tflops 1, mfu equals it; the teacher's
    forward is apart and in total_mfu; cumulative FLOPs are tokens x FLOPs per token."""
    teacher = ModelConfig.load(ws / "teacher" / "model_config.json")
    student = SubnetConfig.load(ws / "subnet.json", teacher).student_config(teacher)
    per_token = training_flops_per_token(student, SEQ)
    teacher_per_token = forward_flops_per_token(teacher, SEQ)
    for i, r in runs["fp32"].items():
        per_device = r["tokens_per_s"] / 2  # two ranks, each a device
        assert r["model_tflops"] == pytest.approx(per_token * per_device / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["model_tflops"], rel=1e-9)  # a peak of 1 TFLOP/s
        assert r["teacher_tflops"] == pytest.approx(teacher_per_token * per_device / 1e12, rel=1e-9)
        assert r["total_mfu"] == pytest.approx(r["mfu"] + r["teacher_tflops"], rel=1e-9)
        assert r["train_flops"] == pytest.approx(per_token * i * GLOBAL * SEQ, rel=1e-12)
        assert r["teacher_flops"] == pytest.approx(teacher_per_token * i * GLOBAL * SEQ, rel=1e-12)
    full = runs["recompute_full"][1]
    assert full["hardware_tflops"] > full["model_tflops"]  # recomputation costs FLOPs that MFU does not count
    assert 0 < runs["bf16_z0"][1]["mfu"] < 1  # against the measured bf16 matmul peak of this CPU


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--recompute-activations", "--recompute-granularity", "full"], ["--recompute-activations", "full"]),
        (["--compile"], ["--compile", "ZeRO stage 3"]),
    ],
)
def test_flags_that_do_not_go_together_are_one_line(ws, tmp_path, extra, needles):
    result = run(python_cmd(flags(ws, "zero3.json", tmp_path / "log", *extra)), ws, timeout=120)
    assert result.returncode == 2, result.tail()
    assert "Traceback" not in result.stderr, result.tail()
    errors = result.error_lines()
    assert len(errors) == 1 and all(n in errors[0] for n in needles), result.tail()
