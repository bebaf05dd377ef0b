"""benchmarks/paper_experiment.py at ``--scale smoke`` (a tiny random parent; the plumbing, not the claim) and the
trainer's ``--extra-valid-data-path`` it evaluates the second held-out text with.

The smoke run is one subprocess; the assertions check what its JSON says against what it must be: every arm at
the budget, one data order (equal starting losses where the initialisation is equal), training FLOPs equal to
the FLOP counter's, the equal-FLOPs arm within one step's rounding of the KD arm, search and importance FLOPs at
the start of the curves that used them, multipliers and Spearman's rho recomputed from the stored numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training_utils import GLOBAL, MICRO, SEQ, assert_one_line_error, base_env, build_workspace, ok, python_cmd
from tests.training_utils import run as run_job

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_experiment.py"
ARMS = {"random_init", "first_k_kd", "width_oneshot_kd", "depth_oneshot_kd", "evolution_kd", "random_search_kd",
        "evolution_ce_tokens", "evolution_ce_flops"}  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("paper_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_smoke(output: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--scale", "smoke", "--output", str(output), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=base_env(), timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("paper") / "smoke"
    proc = run_smoke(output)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return output, json.loads((output / "results.json").read_text())


def test_smoke_writes_every_arm_at_the_budget(smoke):
    output, results = smoke
    names = [a["name"] for a in results["arms"]]
    assert set(names) == ARMS
    assert sorted(a["seed"] for a in results["arms"] if a["name"] == "evolution_kd") == [0, 1]
    assert sorted(a["seed"] for a in results["arms"] if a["name"] == "random_search_kd") == [0, 1]
    parent_total = results["parent"]["total_params"]
    tolerance = results["scale"]["tolerance"]
    for arm in results["arms"]:
        assert abs(arm["total_params"] / (0.5 * parent_total) - 1) <= tolerance, arm["name"]
        assert arm["non_embedding_params"] < arm["total_params"]
    evolution0 = next(a for a in results["arms"] if a["name"] == "evolution_kd" and a["seed"] == 0)
    baseline = next(a for a in results["arms"] if a["name"] == "random_init")
    assert (baseline["total_params"], baseline["non_embedding_params"]) == (
        evolution0["total_params"], evolution0["non_embedding_params"])  # the searched shape, random weights
    table = (output / "table.md").read_text()
    assert sum(line.startswith("| ") and "---" not in line for line in table.splitlines()) == len(names) + 1
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_curves_share_data_order_and_count_flops(smoke):
    from megatron_subnet.model.flops import training_flops_per_token
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config

    _, results = smoke
    scale = results["scale"]
    tokens_per_step = scale["global_batch_size"] * scale["seq_length"]
    parent = load_config(results["parent"]["path"])
    arms = {(a["name"], a["seed"]): a for a in results["arms"]}
    for arm in results["arms"]:
        ev = arm["evaluations"]
        steps = ev[-1]["iteration"]
        assert [e["iteration"] for e in ev] == [steps * k // 4 for k in range(5)], arm["name"]
        assert all(e["tokens"] == e["iteration"] * tokens_per_step for e in ev)
        assert all(math.isfinite(e["valid_loss"]) and math.isfinite(e["heldout_loss"]) for e in ev)
        assert ev[0]["flops"] == arm["search_and_importance_flops"]  # the search's cost starts the curve
        assert (ev[-1]["teacher_flops"] > 0) == arm["kd"]
        search = results["searches"][arm["search"]] if arm["search"] else None
        if search is None:
            assert arm["search_and_importance_flops"] == 0
        else:
            importance = results["importance_flops"] if search["mode"] != "first_k" else 0
            assert arm["search_and_importance_flops"] == search["flops"] + importance > 0
            student = SubnetConfig.load(search["subnet"], parent).student_config(parent)
            per_token = training_flops_per_token(student, scale["seq_length"])
            assert ev[-1]["train_flops"] == pytest.approx(per_token * ev[-1]["tokens"], rel=1e-9)
    # the same initialisation and the same validation batches: the same starting loss, to the bit
    kd, ce = arms[("evolution_kd", 0)], arms[("evolution_ce_tokens", 0)]
    assert kd["evaluations"][0]["valid_loss"] == ce["evaluations"][0]["valid_loss"]
    assert kd["evaluations"][0]["heldout_loss"] == ce["evaluations"][0]["heldout_loss"]
    # equal FLOPs: the CE arm's training FLOPs match the KD arm's student + teacher FLOPs within 2 steps' rounding
    flops_arm = arms[("evolution_ce_flops", 0)]["evaluations"][-1]
    kd_last = kd["evaluations"][-1]
    per_step = kd_last["train_flops"] / kd_last["iteration"]
    assert abs(flops_arm["train_flops"] - kd_last["train_flops"] - kd_last["teacher_flops"]) <= 2 * per_step
    assert flops_arm["iteration"] > kd_last["iteration"]


def test_smoke_multipliers_and_spearman_follow_from_the_stored_numbers(smoke):
    module = load_script()
    _, results = smoke
    assert results["multipliers"] == module.multipliers(results["arms"])
    proxy = results["spearman"]
    assert len(proxy["candidates"]) >= 12 and len({c["key"] for c in proxy["candidates"]}) == len(proxy["candidates"])
    untrained = [c["untrained_loss"] for c in proxy["candidates"]]
    trained = [c["trained_loss"] for c in proxy["candidates"]]
    ranks_a = np.argsort(np.argsort(untrained))
    ranks_b = np.argsort(np.argsort(trained))
    assert proxy["rho"] == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1], abs=1e-9)  # no ties in float losses
    assert "selection" in proxy["untrained_on"] and "scored on" in proxy["trained_on"]


def test_reach_interpolates_and_spearman_handles_ties():
    module = load_script()
    curve = [{"tokens": 0, "valid_loss": 5.0}, {"tokens": 100, "valid_loss": 4.0}, {"tokens": 200, "valid_loss": 3.0}]
    assert module.reach(curve, 3.5, "tokens") == pytest.approx(150.0)
    assert module.reach(curve, 5.5, "tokens") == 0
    assert module.reach(curve, 2.0, "tokens") is None
    assert module.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert module.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert module.ranks([2.0, 1.0, 2.0]) == [2.5, 1.0, 2.5]
    assert math.isnan(module.spearman([1, 1, 1], [1, 2, 3]))


def test_a_rerun_reuses_the_steps_and_other_settings_are_refused(smoke):
    output, results = smoke
    again = run_smoke(output)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== pretrain_slm.py" not in again.stdout and "== tools/search_subnet.py" not in again.stdout
    rerun = json.loads((output / "results.json").read_text())
    assert rerun["arms"] == results["arms"] and rerun["spearman"] == results["spearman"]
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    refused = run_smoke(output, "--seeds", "0", "2")
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "other settings (seeds)" in lines[0] and "--overwrite" in lines[0], refused.stderr
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before


def test_extra_valid_loss_is_the_loss_of_the_final_model_on_that_text(tmp_path):
    import torch

    from megatron_subnet.data.batches import load_batches
    from megatron_subnet.data.indexed import IndexedDatasetBuilder
    from megatron_subnet.model.evaluation import evaluate_model
    from megatron_subnet.model.weights import load_model

    ws = build_workspace(tmp_path / "ws")
    rng = np.random.default_rng(7)
    with IndexedDatasetBuilder(ws / "heldout", np.uint16) as builder:
        for _ in range(30):
            builder.add_document(rng.integers(0, 127, rng.integers(20, 90)))
    iters, eval_iters = 4, 2
    argv = ["--ds_config", f"{ws}/zero0.json", "--teacher-load", f"{ws}/teacher", "--subnet", f"{ws}/subnet.json",
            "--data-path", f"{ws}/data", "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL),
            "--seq-length", str(SEQ), "--train-iters", str(iters), "--lr", "1e-3", "--min-lr", "1e-4",
            "--eval-interval", "2", "--eval-iters", str(eval_iters), "--log-interval", "1", "--kd-alpha", "0.5",
            "--extra-valid-data-path", f"{ws}/heldout", "--save", f"{tmp_path}/save", "--peak-tflops", "1"]  # fmt: skip
    ok(run_job(python_cmd(argv), tmp_path))
    records = [json.loads(line) for line in (tmp_path / "save" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "valid_loss" in r]
    assert [r["iteration"] for r in evals] == [0, 2, 4]
    assert all("extra_valid_loss" in r and r["extra_valid_loss"] != r["valid_loss"] for r in evals)
    model = load_model(tmp_path / "save" / "final_model", "cpu").eval()
    # the trainer's evaluation set: the first --eval-iters micro-batches of a dataset of eval-iters global batches
    batches = load_batches(f"{ws}/heldout", "0,1,0", "valid", SEQ, MICRO, eval_iters * GLOBAL // MICRO, 1234)
    batches = batches[:eval_iters]
    with torch.no_grad():
        loss = evaluate_model(model, batches, "cpu", progress=False).loss
    assert evals[-1]["extra_valid_loss"] == pytest.approx(loss, rel=1e-6)
    missing = run_job(python_cmd([*argv[:-6], "--extra-valid-data-path", f"{ws}/nowhere"]), tmp_path)
    assert_one_line_error(missing, "--extra-valid-data-path", "no such file")
    with IndexedDatasetBuilder(ws / "other_vocab", np.uint16) as builder:
        builder.add_document(np.array([1, 500, 3]))
    other = run_job(python_cmd([*argv[:-6], "--extra-valid-data-path", f"{ws}/other_vocab"]), tmp_path)
    assert_one_line_error(other, f"--extra-valid-data-path {ws}/other_vocab", "token id 500")
