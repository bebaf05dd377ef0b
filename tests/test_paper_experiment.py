"""benchmarks/paper_experiment.py at ``--scale smoke`` (a tiny random parent; the plumbing, not the claim) and the
trainer's ``--extra-valid-data-path`` it evaluates the second held-out text with.

The smoke run is one subprocess; the assertions check what its JSON says against what it must be, recomputed
here from the stored numbers and the inputs: every arm inside the budget; its FLOPs the sum of its parts, and
of the importance pass only the part its initialisation used; training FLOPs equal to the FLOP counter's; every
multiplier measured from the curves or marked not reached; paired differences on equal data; the teacher's
loss and the arms' first losses on the same batches; the searches' winners picked on held-out samples.
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

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_experiment.py"
USED = {"first_k": {"search"}, "paper": {"search"}, "width": {"search", "calibration"},
        "evolution": {"search", "calibration"}, "random_search": {"search", "calibration"},
        "depth": {"search", "drop_loss"}, "random": set()}  # fmt: skip


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


def arms_by(results: dict) -> dict[tuple[str, int], dict]:
    return {(a["name"], a["seed"]): a for a in results["arms"]}


def test_smoke_runs_every_arm_inside_the_budget(smoke):
    output, results = smoke
    module = load_script()
    seeds = results["data_seeds"]
    expected = {("random_init_ce", seeds[0]), ("random_init_kd", seeds[0])}
    for init in module.INITS:
        for objective in module.OBJECTIVES:
            on = seeds if init in module.DECISION_INITS and objective != "kdw" else seeds[:1]
            expected |= {(f"{init}_{objective}", seed) for seed in on}
    assert set(arms_by(results)) == expected and len(results["arms"]) == len(expected)
    parent_total, tolerance = results["parent"]["total_params"], results["scale"]["tolerance"]
    for arm in results["arms"]:
        assert abs(arm["total_params"] / (0.5 * parent_total) - 1) <= tolerance, arm["name"]
        assert arm["non_embedding_params"] < arm["total_params"]
    random, first_k = arms_by(results)["random_init_ce", seeds[0]], arms_by(results)["first_k_kd", seeds[0]]
    assert (random["total_params"], random["non_embedding_params"]) == (
        first_k["total_params"], first_k["non_embedding_params"])  # the first-k shape, random weights
    scale = results["scale"]
    assert random["iters"] == scale["train_iters"] * scale["random_multiple"] and random["lr"] == scale["random_lr"]
    table = (output / "table.md").read_text()
    assert table.count("\n| ") >= 2 * len(expected) and "Teacher (the parent itself)" in table
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_flops_add_up_and_only_what_an_arm_used_is_charged(smoke):
    from megatron_subnet.model.flops import training_flops_per_token
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config

    _, results = smoke
    scale = results["scale"]
    tokens_per_step = scale["global_batch_size"] * scale["seq_length"]
    parent = load_config(results["parent"]["path"])
    importance = results["importance_flops"]
    assert importance["calibration"] > 0 and importance["drop_loss"] > 0
    for arm in results["arms"]:
        parts = arm["start_flops"]
        assert set(parts) == USED[arm["init"]], arm["name"]
        if arm["init"] != "random":
            assert parts["search"] == results["searches"][arm["init"]]["flops"] > 0
        assert all(parts[p] == importance[p] for p in parts if p != "search")
        student = SubnetConfig.load(results["searches"][arm["search"] or "first_k"]["subnet"], parent)
        per_token = training_flops_per_token(student.student_config(parent), scale["seq_length"])
        ev = arm["evaluations"]
        assert ev[-1]["iteration"] == arm["iters"]
        for e in ev:
            assert e["tokens"] == e["iteration"] * tokens_per_step
            assert e["flops"] == sum(parts.values()) + e["train_flops"] + e["teacher_flops"]
            assert e["train_flops"] == pytest.approx(per_token * e["tokens"], rel=1e-9)
            assert math.isfinite(e["valid_loss"]) and math.isfinite(e["heldout_loss"])
        assert (ev[-1]["teacher_flops"] > 0) == (arm["objective"] != "ce")


def test_smoke_multipliers_are_measured_from_the_curves_or_marked_not_reached(smoke):
    _, results = smoke

    def first_crossing(curve: list[dict], target: float, axis: str) -> float | None:
        xs, ys = [e[axis] for e in curve], [e["valid_loss"] for e in curve]
        for i, y in enumerate(ys):
            if y <= target:
                return xs[0] if i == 0 else float(np.interp(target, [ys[i], ys[i - 1]], [xs[i], xs[i - 1]]))
        return None

    by = arms_by(results)
    baseline = by["random_init_ce", results["data_seeds"][0]]["evaluations"]
    assert len(results["to_target"]["targets"]) == 4
    for target in results["to_target"]["targets"]:
        loss = target["target_loss"]
        assert any(e["valid_loss"] == loss for e in baseline)  # a point of random init's own curve
        assert len(target["arms"]) == len(results["arms"]) - 1
        for row in target["arms"]:
            curve = by[row["name"], row["seed"]]["evaluations"]
            for axis in ("tokens", "flops"):
                used, base = first_crossing(curve, loss, axis), first_crossing(baseline, loss, axis)
                assert target["random_init"][axis] == pytest.approx(base)
                if used is None:
                    assert not row["reached"] and row[axis] is None and row[f"{axis}_multiplier"] is None
                else:
                    assert row["reached"] and row[axis] == pytest.approx(used)
                    if used > 0:
                        assert row[f"{axis}_multiplier"] == pytest.approx(base / used)
            assert row["at_start"] == (row["tokens"] == 0)


def test_smoke_paired_differences_use_equal_data(smoke):
    _, results = smoke
    by, budget = arms_by(results), results["scale"]["train_iters"]
    for pair in results["paired"].values():
        assert pair["n"] == len(pair["seeds"]) == len(pair["values"])
        if pair["n"] > 1:
            assert pair["std"] == pytest.approx(np.std(pair["values"], ddof=1))
        assert pair["mean"] == pytest.approx(np.mean(pair["values"]))
    evolution = results["paired"]["evolution: kd - ce, equal tokens"]
    assert evolution["seeds"] == results["data_seeds"]
    for seed, value in zip(evolution["seeds"], evolution["values"]):
        kd, ce = by["evolution_kd", seed], by["evolution_ce", seed]
        ce_at_budget = next(e for e in ce["evaluations"] if e["iteration"] == budget)
        assert ce_at_budget["tokens"] == kd["evaluations"][-1]["tokens"]  # equal tokens, same data order
        assert value == pytest.approx(kd["evaluations"][-1]["valid_loss"] - ce_at_budget["valid_loss"])
        # the same initialisation, seed and validation batches: the same first loss, to the bit
        assert kd["evaluations"][0]["valid_loss"] == ce["evaluations"][0]["valid_loss"]
        # equal FLOPs: the CE run's end costs the KD run's student + teacher FLOPs, within one interval
        kd_last, ce_last = kd["evaluations"][-1], ce["evaluations"][-1]
        per_step = kd_last["train_flops"] / kd_last["iteration"]
        interval = budget // 4
        assert abs(ce_last["train_flops"] - kd_last["train_flops"] - kd_last["teacher_flops"]) <= interval * per_step
        assert ce_last["iteration"] > budget
    flops = results["paired"]["evolution: kd - ce, equal FLOPs"]
    assert flops["values"] == [by["evolution_kd", s]["evaluations"][-1]["valid_loss"]
                               - by["evolution_ce", s]["evaluations"][-1]["valid_loss"] for s in flops["seeds"]]


def test_smoke_teacher_and_arms_are_scored_on_the_same_batches_and_searches_pick_held_out(smoke):
    from megatron_subnet.data.batches import load_batches
    from megatron_subnet.model.evaluation import evaluate_model
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.search.fitness import SubnetFitness, load_parent

    _, results = smoke
    scale, seed = results["scale"], results["data_seeds"][0]
    parent = load_parent(results["parent"]["path"])
    batches = load_batches(results["data"]["train"], results["data"]["split"], "valid", scale["seq_length"],
                           scale["micro_batch_size"], scale["eval_iters"], seed)  # fmt: skip
    assert results["teacher"]["valid_loss"] == pytest.approx(evaluate_model(parent, batches, progress=False).loss)
    subnet = SubnetConfig.load(results["searches"]["first_k"]["subnet"], parent.config)
    first = arms_by(results)["first_k_kd", seed]["evaluations"][0]["valid_loss"]
    assert first == pytest.approx(SubnetFitness(parent, batches).loss(subnet), rel=1e-5)
    for search in results["searches"].values():
        assert search["selected_by"] == "heldout"
        best = min(search["rescored"], key=lambda r: (r["heldout_loss"], r["key"]))
        assert search["winner"]["key"] == best["key"] and search["winner"]["heldout_loss"] == best["heldout_loss"]


def test_smoke_spearman_follows_from_the_stored_numbers(smoke):
    _, results = smoke
    proxy = results["spearman"]
    assert len(proxy["candidates"]) >= 12 and len({c["key"] for c in proxy["candidates"]}) == len(proxy["candidates"])

    def rho(rows: list[dict]) -> float:
        a, b = [r["untrained_loss"] for r in rows], [r["trained_loss"] for r in rows]
        return np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]  # no ties in float losses

    assert proxy["rho"] == pytest.approx(rho(proxy["candidates"]), abs=1e-9)
    top = sorted(proxy["candidates"], key=lambda r: r["untrained_loss"])[: proxy["top"]]
    assert proxy["top"] == max(3, len(proxy["candidates"]) // 4)
    assert proxy["rho_top"] == pytest.approx(rho(top), abs=1e-9)
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
    refused = run_smoke(output, "--data-seeds", "1234", "1236")
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "other settings (data_seeds)" in lines[0] and "--overwrite" in lines[0], refused.stderr
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
