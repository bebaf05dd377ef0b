"""End-to-end training on CPU (gloo, tiny models, real launchers): ZeRO 0-3 and gradient accumulation agree,
the deepspeed/torchrun/mpirun launchers, distillation with a frozen co-resident teacher, bit-exact resume,
a SIGKILL in the middle of a checkpoint, NaN/Inf steps, one-line errors, and the run's outputs.

Every job is a subprocess (one thread per process) with a hard timeout that kills its whole process group.
Training jobs run ``tests/training_utils.py``: ``pretrain_slm.py`` plus the test hooks described there.
The reference runs (6 steps at each ZeRO stage on 2 ranks, and on 1 process with 4x accumulation) are made
once per module, when a test first needs them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import free_port
from tests.training_utils import (
    EXAMPLES,
    GLOBAL,
    MICRO,
    SEQ,
    Result,
    assert_one_line_error,
    batch_records,
    build_workspace,
    deepspeed_shm_files,
    file_sha256,
    latest_tag,
    launch_cmd,
    ok,
    python_cmd,
    read_jsonl,
    run,
    run_many,
    spawn_cmd,
    torchrun_cmd,
    train_records,
)

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

ITERS, EVAL_INTERVAL, EVAL_ITERS, SAVE_INTERVAL, SEED = 6, 3, 2, 3, 1234
SPLIT = "80,10,10"
# Two ranks; "single" is one process with twice the accumulation (the same global batch of 4).
REFERENCES = {"z0": (0, 2), "z1": (1, 2), "z2": (2, 2), "z3": (3, 2), "single": (0, 1)}


def common_flags(ws: Path, stage: int, iters: int = ITERS) -> list[str]:
    return [
        "--ds_config", f"{ws}/zero{stage}.json",
        "--teacher-load", f"{ws}/teacher",
        "--subnet", f"{ws}/subnet.json",
        "--data-path", f"{ws}/data",
        "--split", SPLIT,
        "--micro-batch-size", str(MICRO),
        "--global-batch-size", str(GLOBAL),
        "--seq-length", str(SEQ),
        "--train-iters", str(iters),
        "--lr", "1e-3",
        "--min-lr", "1e-4",
        "--lr-warmup-iters", "2",
        "--seed", str(SEED),
        "--log-interval", "1",
        "--eval-interval", str(EVAL_INTERVAL),
        "--eval-iters", str(EVAL_ITERS),
    ]  # fmt: skip


def losses(records: dict[int, dict], key: str = "loss") -> list[float]:
    return [records[i][key] for i in sorted(records)]


def assert_close(actual: list[float], expected: list[float], rel: float = 1e-6, abs_tol: float = 1e-12) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, rel=rel, abs=abs_tol), (actual, expected)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("training"))


@pytest.fixture(scope="module")
def teacher_sha(ws) -> str:
    return file_sha256(ws / "teacher" / "model.safetensors")


class References:
    """The reference runs, each made on first use: 6 steps, checkpoints at 3 and 6, batch hashes, teacher report."""

    def __init__(self, ws: Path):
        self.ws = ws
        self.results: dict[str, Result] = {}

    def __call__(self, name: str) -> Path:
        out = self.ws / f"ref_{name}"
        if name not in self.results:
            stage, nproc = REFERENCES[name]
            hooks = {"record_dir": str(out / "batches"), "teacher_report": str(out / "teacher_report")}
            flags = common_flags(self.ws, stage) + ["--save", str(out / "ckpt"), "--save-interval", str(SAVE_INTERVAL)]
            flags += ["--log-dir", str(out)]
            self.results[name] = run(launch_cmd(nproc, flags), self.ws, hooks=hooks)
        if self.results[name].returncode != 0:  # a failed reference fails every test that needs it, once
            pytest.fail(f"reference run {name} failed:\n{self.results[name].tail()}", pytrace=False)
        return out


@pytest.fixture(scope="module")
def refs(ws) -> References:
    return References(ws)


# ----------------------------------------------------------------------------- 1. ZeRO stages, accumulation


def test_zero_stages_and_accumulation_give_the_same_losses(refs):
    """2 ranks at ZeRO 0/1/2/3 and 1 rank with 2x accumulation: the same losses (CE and KD parts too),
    learning rates and gradient norms, step after step; on 2 ranks every stage sees the same batches."""
    base = train_records(refs("z0"))
    assert sorted(base) == list(range(1, ITERS + 1))
    assert all(r["kd"] > 0 and math.isfinite(r["loss"]) and not r["skipped"] for r in base.values())
    base_batches = batch_records(refs("z0") / "batches")
    assert sorted(base_batches) == [0, 1] and base_batches[0] != base_batches[1]
    for name in ("z1", "z2", "z3", "single"):
        records = train_records(refs(name))
        assert sorted(records) == sorted(base), name
        for key in ("loss", "ce", "lr"):
            assert_close(losses(records, key), losses(base, key))
        # the KD part is ~1/250 of the loss: the same absolute agreement, not the same relative one
        assert_close(losses(records, "kd"), losses(base, "kd"), abs_tol=1e-7)
        assert_close(losses(records, "grad_norm"), losses(base, "grad_norm"), rel=1e-5)
        assert [r["tokens"] for r in records.values()] == [i * GLOBAL * SEQ for i in range(1, ITERS + 1)]
        if name != "single":
            assert batch_records(refs(name) / "batches") == base_batches, name


def test_teacher_is_frozen_and_outside_the_optimizer_at_zero0_and_zero3(refs, ws, teacher_sha):
    """After 6 steps the co-resident teacher is bit-identical to its checkpoint (gathered under ZeRO-3), shares
    no tensor with the student, is in no optimizer, trains nothing and holds no gradient."""
    for name in ("z0", "z3"):
        for rank in (0, 1):
            report = json.loads((refs(name) / "teacher_report" / f"rank_{rank}.json").read_text())
            assert report == {
                "zero_stage": REFERENCES[name][0],
                "names_match": True,
                "bit_identical": True,
                "shared_with_student": 0,
                "in_optimizer": 0,
                "requires_grad": 0,
                "has_grad": 0,
                "teacher_training_mode": False,
            }, (name, rank)
    assert file_sha256(ws / "teacher" / "model.safetensors") == teacher_sha


def test_optimizer_never_sees_the_teacher(ws):
    """In process: the student cut from the teacher shares no storage with it; build_optimizer(student) holds
    exactly the student's trainable tensors; Teacher() freezes its model (eval, no grad)."""
    from megatron_subnet.model.extract import extract_state_dict
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_checkpoint
    from megatron_subnet.training.engine import Teacher, build_optimizer

    config, state = load_checkpoint(ws / "teacher")
    for subnet_file in ("subnet.json", "full_subnet.json"):
        student_config, weights = extract_state_dict(config, state, SubnetConfig.load(ws / subnet_file, config))
        student = GPTModel(student_config)
        student.load_state_dict(weights)
        teacher_model = GPTModel(config)
        teacher_model.load_state_dict(state)
        teacher = Teacher(teacher_model, {"zero_optimization": {"stage": 0}}, "cpu")
        optimizer = build_optimizer(student, 1e-3, 0.1, (0.9, 0.95), 1e-8)
        in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
        assert {id(p) for p in in_optimizer} == {id(p) for p in student.parameters()}
        assert len(in_optimizer) == len(list(student.parameters()))
        teacher_params = list(teacher.module.parameters())
        assert not {id(p) for p in teacher_params} & {id(p) for p in in_optimizer}
        teacher_ptrs = {p.untyped_storage().data_ptr() for p in teacher_params}
        assert not teacher_ptrs & {p.untyped_storage().data_ptr() for p in student.parameters()}
        assert not teacher.module.training and not any(p.requires_grad for p in teacher_params)
        before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
        tokens = torch.randint(0, config.vocab_size, (2, 9))
        student(tokens).float().pow(2).mean().backward()
        optimizer.step()
        teacher(tokens)
        assert all(torch.equal(v, before[k]) for k, v in teacher.module.state_dict().items())
        assert all(p.grad is None for p in teacher_params)


# ----------------------------------------------------------------------------- 2. launchers


LAUNCHERS = {
    "deepspeed": ("launch_deepspeed.sh", {"NUM_GPUS": "2"}),
    "torchrun": ("launch_torchrun.sh", {"NPROC_PER_NODE": "2"}),
    "mpirun": ("launch_mpirun.sh", {"NP": "2"}),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_runs_a_job_end_to_end(launcher, ws, refs, tmp_path):
    """examples/launch_<launcher>.sh with 2 processes runs pretrain_slm.py to the end: metrics for every step
    (the same losses as the reference ZeRO-1 run), the final checkpoint and the exported model."""
    script, env = LAUNCHERS[launcher]
    env = {**env, "MASTER_PORT": str(free_port())}
    save = tmp_path / "ckpt"
    flags = common_flags(ws, 1) + ["--save", str(save)]
    try:
        result = ok(run(["bash", EXAMPLES / script, *flags], tmp_path, env=env, timeout=240))
    finally:
        leaked = deepspeed_shm_files(env["MASTER_PORT"])
        for path in leaked:  # DeepSpeed's CPU shm all-reduce buffers (the script removes them; on failure we do)
            path.unlink(missing_ok=True)
    assert not leaked, leaked
    records = train_records(save)
    assert sorted(records) == list(range(1, ITERS + 1)), result.tail()
    assert_close(losses(records), losses(train_records(refs("z1"))))
    assert "data parallel 2, ZeRO stage 1" in result.stdout + result.stderr
    assert latest_tag(save) == f"iter_{ITERS:07d}"
    meta = json.loads((save / f"iter_{ITERS:07d}" / "megatron_subnet.json").read_text())
    assert meta["iteration"] == ITERS and meta["consumed_samples"] == ITERS * GLOBAL
    assert meta["layout"] == {
        "world_size": 2, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": 1, "zero_stage": 1, "bf16": False,
        "pipeline_layer_split": [2],  # the student's 2 layers on its one stage
    }  # fmt: skip
    assert (save / "final_model" / "model.safetensors").is_file()
    assert (save / "loss_curve.png").is_file()


# ----------------------------------------------------------------------------- 3. distillation


def test_kd_loss_is_zero_when_the_student_is_the_teacher(ws, teacher_sha, tmp_path):
    """--kd-alpha 1 with the full sub-network: the KD loss of the first step (the unchanged student) is 0 for
    forward, reverse and top-k KL, and the loss is the KD loss alone; the teacher stays bit-identical."""
    kinds = ("forward_kl", "reverse_kl", "topk_kl")
    jobs = []
    for kind in kinds:
        flags = common_flags(ws, 0, iters=2)
        flags[flags.index("--subnet") + 1] = str(ws / "full_subnet.json")
        flags += ["--kd-alpha", "1", "--kd-loss", kind, "--kd-topk", "8", "--kd-temperature", "2"]
        flags += ["--eval-iters", "0", "--log-dir", str(tmp_path / kind)]
        hooks = {"teacher_report": str(tmp_path / kind / "teacher_report")}
        jobs.append((python_cmd(flags), tmp_path, None, 180, hooks))
    for kind, result in zip(kinds, run_many(jobs)):
        ok(result)
        first = train_records(tmp_path / kind)[1]
        assert abs(first["kd"]) < 1e-6, (kind, first)
        assert first["loss"] == pytest.approx(4 * first["kd"], abs=1e-9)  # alpha T^2 KL, T = 2
        assert first["ce"] > 1.0  # the CE is still computed and logged
        report = json.loads((tmp_path / kind / "teacher_report" / "rank_0.json").read_text())
        assert report["bit_identical"] and report["in_optimizer"] == 0 and report["has_grad"] == 0, report
    assert file_sha256(ws / "teacher" / "model.safetensors") == teacher_sha


# ----------------------------------------------------------------------------- 4. resume


@pytest.mark.parametrize("name", ["z1", "single"])
def test_resume_is_bit_exact(name, ws, refs, tmp_path):
    """Stop after the checkpoint of step 3 (the job ends there), resume with --load to step 6: every loss is
    bit-identical to the uninterrupted run's and every rank sees the same batches at the same step."""
    stage, nproc = REFERENCES[name]
    save, batches = tmp_path / "ckpt", tmp_path / "batches"
    flags = common_flags(ws, stage) + ["--save", str(save), "--save-interval", str(SAVE_INTERVAL)]
    hooks = {"record_dir": str(batches), "stop_after_save": 3}
    ok(run(launch_cmd(nproc, flags + ["--log-dir", str(tmp_path / "a")]), tmp_path, hooks=hooks))
    assert latest_tag(save) == "iter_0000003"
    assert sorted(train_records(tmp_path / "a")) == [1, 2, 3]
    hooks = {"record_dir": str(batches), "callback_log": str(tmp_path / "callbacks.jsonl")}
    flags += ["--load", str(save), "--log-dir", str(tmp_path / "b")]
    ok(run(launch_cmd(nproc, flags), tmp_path, hooks=hooks))
    assert_callbacks_in_order(read_jsonl(tmp_path / "callbacks.jsonl"), tmp_path / "b", save, nproc)

    reference = train_records(refs(name))
    resumed = {**train_records(tmp_path / "a"), **train_records(tmp_path / "b")}
    assert sorted(train_records(tmp_path / "b")) == [4, 5, 6]
    for key in ("loss", "ce", "kd", "grad_norm", "lr", "tokens"):
        assert losses(resumed, key) == losses(reference, key), key  # exact float equality
    assert batch_records(batches) == batch_records(refs(name) / "batches")
    meta = json.loads((save / f"iter_{ITERS:07d}" / "megatron_subnet.json").read_text())
    assert meta["consumed_samples"] == ITERS * GLOBAL


def assert_callbacks_in_order(events: list[dict], log_dir: Path, save: Path, nproc: int) -> None:
    """The resumed run's callbacks: setup at the checkpoint's iteration 3, then each step's start and end
    (with the step's micro-batches and logged loss), the evaluation and the checkpoint of step 6."""
    names = [(e["event"], e["iteration"]) for e in events]
    steps = [(event, i) for i in (4, 5, 6) for event in ("step_start", "step_end")]
    assert names == [("setup_end", 3), *steps, ("evaluation", 6), ("checkpoint_saved", 6)], names
    records = train_records(log_dir)
    assert [e["loss"] for e in events if e["event"] == "step_end"] == [records[i]["loss"] for i in (4, 5, 6)]
    assert {e["micro_batches"] for e in events if e["event"] == "step_start"} == {GLOBAL // (MICRO * nproc)}
    valid = [r["valid_loss"] for r in read_jsonl(log_dir / "metrics.jsonl") if "valid_loss" in r]
    assert [e["valid_loss"] for e in events if e["event"] == "evaluation"] == valid
    assert events[-1]["path"] == str(save / "iter_0000006")


def test_a_longer_run_starts_like_a_shorter_one_and_a_finished_run_can_be_extended(ws, refs, tmp_path):
    """Constant schedule after warm-up: a 4-step and an 8-step run log identical losses for steps 1-4 (the
    data order does not depend on the run's length); the finished 4-step run resumed with --train-iters 8
    equals the 8-step run bit for bit. The cosine run's rates depend on its length: extending it is refused."""
    def flags(iters: int, name: str) -> list[str]:
        argv = common_flags(ws, 0, iters) + ["--lr-decay-style", "constant", "--eval-interval", "2"]
        return argv + ["--save", str(tmp_path / name), "--save-interval", "4", "--log-dir", str(tmp_path / name)]

    short, long = run_many([(python_cmd(flags(n, f"run{n}")), tmp_path, None, 300, None) for n in (4, 8)])
    ok(short)
    ok(long)
    extended = ok(run(python_cmd(flags(8, "run4") + ["--load", str(tmp_path / "run4")]), tmp_path))
    reference = train_records(tmp_path / "run8")
    for key in ("loss", "ce", "kd", "grad_norm", "lr"):  # steps 1-4 of the short run, 5-8 of its extension
        assert losses(train_records(tmp_path / "run4"), key) == losses(reference, key), key
    assert "resuming extends the run (--train-iters: 4 -> 8" in extended.stdout + extended.stderr
    shorter = flags(4, "run8") + ["--load", str(tmp_path / "run8")]  # below the checkpoint's iteration 8
    save = tmp_path / "cosine"
    shutil.copytree(refs("single") / "ckpt", save)
    longer = common_flags(ws, 0, 2 * ITERS) + ["--save", str(save), "--load", str(save), "--log-dir", str(save)]
    meta_path = save / f"iter_{ITERS:07d}" / "megatron_subnet.json"
    meta = json.loads(meta_path.read_text())
    assert meta["args"]["data_order"] == 2
    del meta["args"]["data_order"]  # a checkpoint written before the data order stopped depending on the length
    old = tmp_path / "old"
    shutil.copytree(save, old)
    (old / f"iter_{ITERS:07d}" / "megatron_subnet.json").write_text(json.dumps(meta))
    same = common_flags(ws, 0) + ["--save", str(old), "--load", str(old), "--log-dir", str(old)]
    jobs = [(python_cmd(argv), tmp_path, None, 120, None) for argv in (shorter, longer, same)]
    first, second, third = run_many(jobs)
    assert_one_line_error(first, "--train-iters: 8 -> 4")
    assert_one_line_error(second, f"--train-iters: {ITERS} -> {2 * ITERS}")
    assert_one_line_error(third, "the data order: 1 -> 2")


# ----------------------------------------------------------------------------- 5. SIGKILL mid-checkpoint


def test_sigkill_before_checkpoint_rename_resumes_from_previous(ws, refs, tmp_path):
    """ZeRO-3 on 2 ranks, checkpoints every 2 steps, rank 0 SIGKILLed after writing iter_0000004.tmp but before
    the rename: the job fails, latest still names iter_0000002, and a --load run redoes steps 3-6 with the
    uninterrupted run's losses; its metrics.jsonl (the same --log-dir) holds each step once, the resumed run's
    3 and 4 in place of the killed run's."""
    save = tmp_path / "ckpt"
    flags = common_flags(ws, 3) + ["--save", str(save), "--save-interval", "2"]
    killed = run(
        torchrun_cmd(2, flags + ["--log-dir", str(tmp_path / "a")]), tmp_path, hooks={"kill_before_rename": 4},
        timeout=150,
    )
    assert killed.returncode not in (0, None), killed.tail()
    assert latest_tag(save) == "iter_0000002"
    assert (save / "iter_0000004.tmp").is_dir() and not (save / "iter_0000004").exists()
    resumed = ok(run(torchrun_cmd(2, flags + ["--load", str(save), "--log-dir", str(tmp_path / "a")]), tmp_path))
    steps = [r["iteration"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], resumed.tail()
    records = train_records(tmp_path / "a")
    assert_close(losses(records), losses(train_records(refs("z3"))))
    assert latest_tag(save) == "iter_0000006" and not (save / "iter_0000004.tmp").exists()


# ----------------------------------------------------------------------------- 6. NaN / Inf


@pytest.mark.parametrize("name", ["single", "z2-1rank", "z1-rank1-only"])
def test_nan_step_is_skipped_and_training_continues(name, ws, refs, tmp_path):
    """NaN logits at step 3 (on 1 process at ZeRO-0 and ZeRO-2; on rank 1 of 2 only at ZeRO-1): the step is
    reported skipped, leaves parameters and Adam state bit-identical (on rank 0 too, whose own loss was finite),
    and the following steps are finite and not skipped; steps 1-2 match the clean run."""
    stage, nproc, nan_ranks, reference = {
        "single": (0, 1, None, "single"),
        "z2-1rank": (2, 1, None, "single"),
        "z1-rank1-only": (1, 2, [1], "z1"),
    }[name]
    trace = tmp_path / "trace.jsonl"
    flags = common_flags(ws, stage) + ["--log-dir", str(tmp_path)]
    hooks = {"nan_steps": [3], "nan_ranks": nan_ranks, "param_trace": str(trace)}
    result = ok(run(launch_cmd(nproc, flags), tmp_path, hooks=hooks))
    records = train_records(tmp_path)
    assert sorted(records) == list(range(1, ITERS + 1))
    assert [r["skipped"] for r in records.values()] == [False, False, True, False, False, False]
    assert not math.isfinite(records[3]["loss"])
    assert all(math.isfinite(records[i]["loss"]) for i in (1, 2, 4, 5, 6))
    assert_close([records[1]["loss"], records[2]["loss"]], losses(train_records(refs(reference)))[:2])
    assert "iteration 3: non-finite loss or gradient" in result.stdout + result.stderr
    steps = {r["iteration"]: r for r in read_jsonl(trace)}
    assert not steps[3]["params_changed"] and steps[3]["adam_steps_after"] == steps[3]["adam_steps_before"]
    assert all(steps[i]["params_changed"] for i in (1, 2, 4, 5, 6))
    assert all(s["params_finite"] for s in steps.values())
    valid = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "valid_loss" in r or "test_loss" in r]
    assert valid and all(math.isfinite(r.get("valid_loss", r.get("test_loss"))) for r in valid)


@pytest.mark.parametrize("name", ["single", "z1-rank1-only", "pp2"])
def test_a_step_reported_skipped_changes_no_weight(name, ws, tmp_path):
    """A NaN loss value whose gradients are finite (as an overflowing T^2 gave): one decision for the optimizer
    and the report. Step 3 is reported skipped and leaves parameters and Adam state bit-identical (at ZeRO-1
    on rank 0 too, whose own loss was finite; at PP=2 on the first stage, which computes no loss); the steps
    around it train."""
    stage, nproc, nan_ranks, extra = {
        "single": (0, 1, None, []),
        "z1-rank1-only": (1, 2, [1], []),
        "pp2": (1, 2, None, ["--pipeline-model-parallel-size", "2"]),
    }[name]
    trace = tmp_path / "trace.jsonl"
    flags = common_flags(ws, stage) + extra + ["--log-dir", str(tmp_path)]
    hooks = {"nan_loss_steps": [3], "nan_ranks": nan_ranks, "param_trace": str(trace)}
    ok(run(launch_cmd(nproc, flags), tmp_path, hooks=hooks))
    records = train_records(tmp_path)
    assert [r["skipped"] for r in records.values()] == [False, False, True, False, False, False]
    steps = {r["iteration"]: r for r in read_jsonl(trace)}
    assert not steps[3]["params_changed"] and steps[3]["adam_steps_after"] == steps[3]["adam_steps_before"]
    assert all(steps[i]["params_changed"] for i in (1, 2, 4, 5, 6))


def test_nan_forever_aborts_and_keeps_the_last_good_checkpoint(ws, refs, tmp_path):
    """NaN from step 3 on with --max-skipped-steps 2: exit 2 with a one-line error naming the flag and the last
    good checkpoint (iter_0000002), which latest still names; resuming from it reproduces the clean run."""
    save = tmp_path / "ckpt"
    flags = common_flags(ws, 0) + ["--save", str(save), "--save-interval", "2", "--max-skipped-steps", "2"]
    aborted = run(python_cmd(flags + ["--log-dir", str(tmp_path / "a")]), tmp_path, hooks={"nan_from": 3})
    line = assert_one_line_error(aborted, "--max-skipped-steps 2", "iteration 4", "iter_0000002")
    assert latest_tag(save) == "iter_0000002", line
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    assert [r["skipped"] for r in train_records(tmp_path / "a").values()] == [False, False, True, True]
    resumed = ok(run(python_cmd(flags + ["--load", str(save), "--log-dir", str(tmp_path / "b")]), tmp_path))
    records = train_records(tmp_path / "b")
    assert sorted(records) == [3, 4, 5, 6], resumed.tail()
    assert losses(records) == losses(train_records(refs("single")))[2:]


# ----------------------------------------------------------------------------- 7. clear errors


def test_bad_launches_fail_with_one_line_errors(ws, refs, tmp_path):
    """ds_config batch size vs --global-batch-size, an 'optimizer' section, resuming at another world size or
    ZeRO stage, and --kd-alpha > 0 without a teacher: exit 2 with one 'error:' line naming the setting."""
    bad_batch = tmp_path / "bad_batch.json"
    bad_batch.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    with_optimizer = tmp_path / "with_optimizer.json"
    with_optimizer.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))

    def flags(stage: int = 0, ds_config: Path | None = None) -> list[str]:
        f = common_flags(ws, stage)
        if ds_config is not None:
            f[f.index("--ds_config") + 1] = str(ds_config)
        return f

    no_teacher = flags()
    for flag in ("--teacher-load", "--subnet"):
        i = no_teacher.index(flag)
        del no_teacher[i : i + 2]
    no_teacher += ["--init", "random", "--model-config", str(ws / "student_config.json")]
    cases = {
        "batch": (flags(ds_config=bad_batch), ("train_batch_size 8", "--global-batch-size 4")),
        "optimizer": (flags(ds_config=with_optimizer), ("'optimizer'", str(with_optimizer))),
        # a checkpoint of 2 ranks at ZeRO-1, resumed by 1 process at ZeRO-1
        "world_size": (flags(1) + ["--load", str(refs("z1") / "ckpt")],
                       ("world_size=2", "world_size=1", "tools/convert_checkpoint.py universal --input")),
        # a checkpoint of 1 process at ZeRO-0, resumed by 1 process at ZeRO-1
        "zero_stage": (flags(1) + ["--load", str(refs("single") / "ckpt")], ("zero_stage=0", "zero_stage=1")),
        "kd_alpha": (no_teacher + ["--kd-alpha", "0.5"], ("--kd-alpha 0.5", "--teacher-load")),
    }
    jobs = [(python_cmd(argv), tmp_path, None, 120, None) for argv, _ in cases.values()]
    for (_, needles), result in zip(cases.values(), run_many(jobs)):
        assert_one_line_error(result, *needles)
    # the failed resumes left the checkpoints as they were
    assert latest_tag(refs("z1") / "ckpt") == latest_tag(refs("single") / "ckpt") == f"iter_{ITERS:07d}"


# ----------------------------------------------------------------------------- 8. outputs


@pytest.mark.parametrize("name", ["z0", "z3"])
def test_metrics_plot_and_exported_model(name, ws, refs):
    """metrics.jsonl holds every training field, validation at 0 (the initial student), 3 and 6 and a final
    test record; the loss curve is a PNG; final_model loads with load_model and reproduces the engine's
    test loss on the same batches."""
    from megatron_subnet.data.gpt_dataset import build_train_valid_test_datasets
    from megatron_subnet.model.weights import load_model
    from megatron_subnet.parallel.losses import cross_entropy
    from megatron_subnet.training.trainer import fixed_batches

    out = refs(name)
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    fields = {"iteration", "loss", "ce", "kd", "lr", "grad_norm", "skipped", "tokens_per_s", "tokens", "peak_memory_mb",
              "model_tflops", "mfu", "hardware_tflops", "teacher_tflops", "total_mfu", "train_flops", "teacher_flops"}
    assert all(set(r) == fields for r in train)
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["grad_norm"] > 0 for r in train)
    valid = [r for r in records if "valid_loss" in r]
    assert [r["iteration"] for r in valid] == [0, 3, 6]
    assert all(r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"])) for r in valid)
    assert "test_loss" in records[-1] and records[-1]["iteration"] == ITERS
    assert records[-1]["test_ppl"] == pytest.approx(math.exp(records[-1]["test_loss"]))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = load_model(out / "ckpt" / "final_model")
    assert json.loads((out / "ckpt" / "final_model" / "subnet.json").read_text()) == json.loads(
        (ws / "subnet.json").read_text()
    )
    evals = ITERS // EVAL_INTERVAL + 1
    num_samples = (ITERS * GLOBAL, evals * EVAL_ITERS * GLOBAL, EVAL_ITERS * GLOBAL)
    _, _, test_ds = build_train_valid_test_datasets([str(ws / "data")], SPLIT, SEQ, SEED, num_samples, None)
    dp = REFERENCES[name][1]
    rank_means = []
    with torch.no_grad():
        for dp_rank in range(dp):
            batches = fixed_batches(test_ds, EVAL_ITERS, MICRO, dp_rank, dp)
            assert batches
            rank_means.append(sum(cross_entropy(model(b[:, :-1]), b[:, 1:]).item() for b in batches) / len(batches))
    assert sum(rank_means) / dp == pytest.approx(records[-1]["test_loss"], abs=1e-5)


# ----------------------------------------------------------------------------- 9. nothing lost, nothing silently wrong


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_new_run_never_takes_over_another_runs_save_dir(ws, refs, tmp_path):
    """--save holding a 6-step run: a fresh 4-step run without --load is refused and changes nothing; with
    --overwrite it runs at ZeRO-1, prunes only its own checkpoints by iteration number (--keep-last 1), keeps
    the old run's, and leaves latest naming its own complete last checkpoint."""
    save = tmp_path / "ckpt"
    shutil.copytree(refs("single") / "ckpt", save)
    before = tree_digest(save)
    flags = common_flags(ws, 1, iters=4) + ["--save", str(save), "--save-interval", "2", "--keep-last", "1"]
    refused = run(python_cmd(flags + ["--log-dir", str(tmp_path / "a")]), tmp_path)
    assert_one_line_error(refused, f"--save {save}", "--load", "--overwrite")
    assert tree_digest(save) == before and not (tmp_path / "a").exists()

    ok(run(python_cmd(flags + ["--overwrite", "--log-dir", str(tmp_path / "b")]), tmp_path))
    tags = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert tags == ["iter_0000003", "iter_0000004", "iter_0000006"]  # the old run's 3 and 6, this run's 4
    assert latest_tag(save) == "iter_0000004"
    assert {k: v for k, v in tree_digest(save).items() if k.startswith(("iter_0000003", "iter_0000006"))} == {
        k: v for k, v in before.items() if k.startswith(("iter_0000003", "iter_0000006"))
    }
    meta = json.loads((save / "iter_0000004" / "megatron_subnet.json").read_text())
    assert meta["iteration"] == 4 and (save / "final_model" / "model.safetensors").is_file()
    assert sorted(train_records(tmp_path / "b")) == [1, 2, 3, 4]


def test_inputs_inside_what_the_run_rewrites_are_refused(ws, refs, tmp_path):
    """--teacher-load SAVE/final_model --save SAVE (even with --overwrite) is refused before any work, and the
    teacher it names stays bit-identical."""
    save = tmp_path / "ckpt"
    shutil.copytree(refs("single") / "ckpt", save)
    before = tree_digest(save)
    flags = common_flags(ws, 0, iters=2)
    flags[flags.index("--teacher-load") + 1] = str(save / "final_model")
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config

    SubnetConfig.full(load_config(save / "final_model")).save(tmp_path / "full.json")  # valid for that teacher
    flags[flags.index("--subnet") + 1] = str(tmp_path / "full.json")
    flags += ["--save", str(save), "--overwrite", "--log-dir", str(tmp_path / "logs")]
    result = run(python_cmd(flags), tmp_path)
    assert_one_line_error(result, "--save", "--teacher-load", "final_model")
    assert tree_digest(save) == before


def test_a_run_whose_every_step_is_skipped_fails_and_writes_no_final_model(ws, tmp_path):
    """NaN logits on every step (fewer than --max-skipped-steps), a checkpoint after each: exit 2 with one line
    saying nothing was trained and naming no checkpoint as good; the checkpoints record 0 applied steps; no
    final model is written. Resuming from them (now at the last iteration, no step left to run) fails the same
    way, on every later resume too, instead of writing the untrained student as the final model."""
    save = tmp_path / "ckpt"
    flags = common_flags(ws, 0, iters=3) + ["--save", str(save), "--save-interval", "1"]
    result = run(python_cmd(flags + ["--log-dir", str(tmp_path)]), tmp_path, hooks={"nan_from": 1})
    assert_one_line_error(result, "every one of this run's 3 steps was skipped", "last good checkpoint: none")
    assert not (save / "final_model").exists()
    assert [r["skipped"] for r in train_records(tmp_path).values()] == [True, True, True]
    meta = json.loads((save / latest_tag(save) / "megatron_subnet.json").read_text())
    assert meta["iteration"] == 3 and meta["steps_applied"] == 0
    for attempt in ("a", "b"):
        resumed = run(python_cmd(flags + ["--load", str(save), "--log-dir", str(tmp_path / attempt)]), tmp_path)
        assert_one_line_error(resumed, f"--load {save}", "every step of the run it continues was skipped")
        assert not (save / "final_model").exists()


def test_a_teacher_or_parent_with_a_non_finite_weight_is_refused_naming_it(ws, tmp_path):
    """One NaN in the teacher (or in a tensor of the parent the student is cut from): one line naming the flag,
    the checkpoint and the tensor, exit 2, nothing saved."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "teacher_nan"
    shutil.copytree(ws / "teacher", broken)
    weights = load_file(broken / "model.safetensors")
    weights["layers.0.mlp.linear_fc2.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors")
    # (teacher, parent, the flag the error names): the teacher as the parent; the parent alone; the teacher alone
    cases = [(broken, None, "--teacher-load"), (ws / "teacher", broken, "--parent-load"),
             (broken, ws / "teacher", "--teacher-load")]  # fmt: skip
    for i, (teacher, parent, flag) in enumerate(cases):
        out = tmp_path / f"case{i}"
        flags = common_flags(ws, 0, iters=2) + ["--save", str(out), "--log-dir", str(out)]
        flags[flags.index("--teacher-load") + 1] = str(teacher)
        flags += ["--parent-load", str(parent)] if parent else []
        result = run(python_cmd(flags), tmp_path)
        assert_one_line_error(result, f"{flag} {broken}", "tensor layers.0.mlp.linear_fc2.weight", "non-finite")
        assert not (out / "final_model").exists() and not list(out.glob("iter_*"))


def test_resume_with_changed_data_or_objective_is_refused_unless_overridden(ws, refs, tmp_path):
    """Resuming the 6-step run with another --seq-length or --kd-alpha is refused with the change named; with
    --override-checkpoint-args it runs and logs the change."""
    save = tmp_path / "ckpt"
    shutil.copytree(refs("single") / "ckpt", save)
    (save / "latest").write_text("iter_0000003")  # resume in the middle of the run
    base = common_flags(ws, 0) + ["--save", str(save), "--load", str(save)]
    changed = [list(base), list(base)]
    changed[0][changed[0].index("--seq-length") + 1] = "16"
    changed[1] += ["--kd-alpha", "0.25"]
    jobs = [(python_cmd(argv + ["--log-dir", str(tmp_path / f"x{i}")]), tmp_path, None, 120, None)
            for i, argv in enumerate(changed)]
    first, second = run_many(jobs)
    assert_one_line_error(first, "--seq-length: 32 -> 16", "--override-checkpoint-args")
    assert_one_line_error(second, "--kd-alpha: 0.5 -> 0.25")
    assert latest_tag(save) == "iter_0000003"
    resumed = ok(run(python_cmd(changed[1] + ["--override-checkpoint-args", "--log-dir", str(tmp_path / "y")]),
                     tmp_path))
    assert "--kd-alpha: 0.5 -> 0.25" in resumed.stdout + resumed.stderr
    assert sorted(train_records(tmp_path / "y")) == [4, 5, 6]


def test_resume_with_another_student_is_refused_and_the_same_one_elsewhere_is_not(ws, refs, tmp_path):
    """Resuming with another --subnet or with --init random would train the checkpoint's student while the
    launch asks for another: refused like another --parent-load, naming the flag. The same sub-network at
    another path is the same student (compared by content) and resumes."""
    save = tmp_path / "ckpt"
    shutil.copytree(refs("single") / "ckpt", save)
    (save / "latest").write_text("iter_0000003")
    base = common_flags(ws, 0) + ["--save", str(save), "--load", str(save)]
    another = list(base)
    another[another.index("--subnet") + 1] = str(ws / "full_subnet.json")
    refused = run_many([(python_cmd(argv + ["--log-dir", str(tmp_path / name)]), tmp_path, None, 120, None)
                        for name, argv in (("a", another), ("b", base + ["--init", "random"]))])  # fmt: skip
    assert_one_line_error(refused[0], "--subnet", "full_subnet.json", "another sub-network", "--override-checkpoint")
    assert_one_line_error(refused[1], "--init: subnet -> random")
    assert latest_tag(save) == "iter_0000003"
    moved = list(base)
    moved[moved.index("--subnet") + 1] = str(shutil.copy(ws / "subnet.json", tmp_path / "same_subnet.json"))
    ok(run(python_cmd(moved + ["--log-dir", str(tmp_path / "c")]), tmp_path))
    assert sorted(train_records(tmp_path / "c")) == [4, 5, 6]


@pytest.mark.parametrize("name, missing", [("single", "mp_rank_00_model_states.pt"),
                                           ("z1", "zero_pp_rank_1_mp_rank_00_optim_states.pt")])  # fmt: skip
def test_a_missing_deepspeed_checkpoint_file_is_named(name, missing, ws, refs, tmp_path):
    """A training checkpoint with one of DeepSpeed's files deleted (the model states; rank 1's optimizer
    partition at ZeRO-1): one line naming the file, not DeepSpeed's bare AssertionError; nothing written."""
    save = tmp_path / "ckpt"
    shutil.copytree(refs(name) / "ckpt", save)
    (save / "latest").write_text("iter_0000003")
    (save / "iter_0000003" / missing).unlink()
    before = tree_digest(save)
    stage, nproc = REFERENCES[name]
    flags = common_flags(ws, stage) + ["--save", str(save), "--load", str(save), "--log-dir", str(tmp_path / "l")]
    assert_one_line_error(run(launch_cmd(nproc, flags), tmp_path), f"iter_0000003/{missing} is missing")
    assert tree_digest(save) == before


def test_ctrl_c_is_one_line_and_exit_130(ws, tmp_path):
    """SIGINT while training: exit 130, one 'error:' line, no traceback, no final model."""
    import signal
    import subprocess
    import time

    from tests.training_utils import base_env

    save = tmp_path / "ckpt"
    flags = common_flags(ws, 0, iters=100000) + ["--save", str(save), "--log-dir", str(tmp_path)]
    proc = subprocess.Popen(python_cmd(flags), cwd=tmp_path, env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "metrics.jsonl").is_file() and "loss" in (tmp_path / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    result = Result(python_cmd(flags), proc.returncode, out, err, 0)
    assert proc.returncode == 130, result.tail()
    assert "Traceback" not in err and len(result.error_lines()) == 1, result.tail()
    assert not (save / "final_model").exists()


# ----------------------------------------------------------------------------- 10. tensor parallelism


def tp_flags(ws: Path, stage: int, tp: int) -> list[str]:
    flags = common_flags(ws, stage)
    flags[flags.index("--subnet") + 1] = str(ws / "subnet_tp2.json")
    return flags + ["--tensor-model-parallel-size", str(tp)]


@pytest.fixture(scope="module")
def tp_runs(ws) -> dict[str, Path]:
    """TP=1 x DP=2 at ZeRO-1 (the reference) and TP=2 x DP=2 at ZeRO 0-3, each with checkpoints and a
    final model; run once for the module."""
    out = {}
    for name, stage, tp in (("tp1_z1", 1, 1), ("tp2_z0", 0, 2), ("tp2_z1", 1, 2), ("tp2_z2", 2, 2), ("tp2_z3", 3, 2)):
        root = ws / f"tp_{name}"
        flags = tp_flags(ws, stage, tp) + ["--save", str(root / "ckpt"), "--save-interval", str(SAVE_INTERVAL)]
        result = run(spawn_cmd(2 * tp, flags + ["--log-dir", str(root)]), ws, hooks={}, timeout=300)
        assert result.returncode == 0, result.tail()
        out[name] = root
    return out


def test_tensor_parallel_training_equals_tp1(tp_runs):
    """TP=2 x DP=2 (4 processes) with a teacher at ZeRO 0-3: the losses (CE and KD parts), learning rates
    and gradient norms of every step equal the TP=1 x DP=2 run's within 1e-5 relative; so do the final models."""
    from megatron_subnet.model.weights import load_checkpoint

    base = train_records(tp_runs["tp1_z1"])
    assert sorted(base) == list(range(1, ITERS + 1)) and all(r["kd"] > 0 for r in base.values())
    _, expected = load_checkpoint(tp_runs["tp1_z1"] / "ckpt" / "final_model")
    for name in ("tp2_z0", "tp2_z1", "tp2_z2", "tp2_z3"):
        records = train_records(tp_runs[name])
        for key in ("loss", "ce", "lr", "grad_norm"):
            assert_close(losses(records, key), losses(base, key), rel=1e-5)
        assert_close(losses(records, "kd"), losses(base, "kd"), rel=1e-4, abs_tol=1e-7)
        assert latest_tag(tp_runs[name] / "ckpt") == f"iter_{ITERS:07d}"
        meta = json.loads((tp_runs[name] / "ckpt" / f"iter_{ITERS:07d}" / "megatron_subnet.json").read_text())
        assert meta["layout"]["tensor_model_parallel_size"] == 2 and meta["layout"]["world_size"] == 2
        assert len(list((tp_runs[name] / "ckpt" / f"iter_{ITERS:07d}").glob("*mp_rank_01*"))) >= 1, name
        _, final = load_checkpoint(tp_runs[name] / "ckpt" / "final_model")
        for key, tensor in expected.items():
            torch.testing.assert_close(final[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name} final {key}")


def test_tensor_parallel_resume_is_bit_exact(ws, tp_runs, tmp_path):
    """TP=2 x DP=2 at ZeRO-1 stopped after the checkpoint of step 3 and resumed: steps 4-6 equal the
    uninterrupted TP=2 run's exactly."""
    save = tmp_path / "ckpt"
    flags = tp_flags(ws, 1, 2) + ["--save", str(save), "--save-interval", str(SAVE_INTERVAL)]
    ok(run(spawn_cmd(4, flags + ["--log-dir", str(tmp_path / "a")]), tmp_path, hooks={"stop_after_save": 3},
           timeout=300))  # fmt: skip
    ok(run(spawn_cmd(4, flags + ["--load", str(save), "--log-dir", str(tmp_path / "b")]), tmp_path, timeout=300))
    resumed = train_records(tmp_path / "b")
    assert sorted(resumed) == [4, 5, 6]
    reference = train_records(tp_runs["tp2_z1"])
    for key in ("loss", "ce", "kd", "grad_norm", "lr", "tokens"):
        assert losses(resumed, key) == [reference[i][key] for i in (4, 5, 6)], key


def test_under_torchrun_a_refusal_is_printed_once(ws, tmp_path):
    """A bad flag that every rank finds alike, under torchrun with 2 ranks: one line (rank 0's), no traceback of
    ours (torchrun prints its own), a failed job; nothing written."""
    flags = common_flags(ws, 0) + ["--kd-temperature", "1e30", "--save", str(tmp_path / "ckpt")]
    result = run(torchrun_cmd(2, flags + ["--log-dir", str(tmp_path / "log")]), tmp_path, timeout=120)
    lines = result.error_lines()
    assert result.returncode not in (0, None) and "megatron_subnet/" not in result.stderr, result.tail()
    assert len(lines) == 1 and "--kd-temperature 1e+30: must lie in [0.1, 100.0]" in lines[0], result.tail()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "log").exists()


def test_layouts_that_do_not_fit_are_refused(ws, tmp_path):
    """The 1-query-group student at TP=2, and 3 processes at TP=2: one line naming the
    dimension (or the world) and the sizes, printed once (rank 0), before any work, and no traceback of ours."""
    jobs = [
        (spawn_cmd(2, common_flags(ws, 0) + ["--tensor-model-parallel-size", "2"]), tmp_path, None, 120, None),
        (spawn_cmd(3, tp_flags(ws, 0, 2)), tmp_path, None, 120, None),
    ]
    needles = (
        "num_query_groups 1 is not divisible by --tensor-model-parallel-size 2",
        "world size 3 is not divisible by --tensor-model-parallel-size 2",
    )
    for result, needle in zip(run_many(jobs), needles):
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode != 0 and "megatron_subnet/" not in result.stderr, result.tail()
        assert len(lines) == 1 and needle in lines[0], result.tail()  # once: rank 0
