"""--parent-load and --teacher-load apart (one process, CPU): the student is cut from the parent, the teacher
distils. The KD term of a run with parent X and teacher Y is the KL computed here from the student cut from X
and teacher Y on the run's own first batch; leaving out --parent-load is today's run exactly; a teacher of
another vocabulary, a missing parent and a parent inside what the run rewrites are one-line errors; a resume
inherits the parent, refuses another one unless --override-checkpoint-args, and the final model's tokenizer
files are the parent's.

Every job is a subprocess with a hard timeout (``tests/training_utils.py``: ``pretrain_slm.py`` plus test hooks).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.training_utils import (
    GLOBAL,
    MICRO,
    SEQ,
    Result,
    assert_one_line_error,
    batch_records,
    build_workspace,
    latest_tag,
    ok,
    python_cmd,
    run,
    run_many,
    train_records,
)

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

ITERS, SEED, SPLIT = 2, 1234, "80,10,10"
KD_ALPHA = 0.5


def flags(ws: Path, parent: str | None, teacher: str | None, iters: int = ITERS) -> list[str]:
    """The tiny run of tests/test_training.py (4 micro-batches of 33 tokens a step), without evaluation."""
    argv = [
        "--ds_config", f"{ws}/zero0.json",
        "--subnet", f"{ws}/subnet.json",
        "--data-path", f"{ws}/data",
        "--split", SPLIT,
        "--micro-batch-size", str(MICRO),
        "--global-batch-size", str(GLOBAL),
        "--seq-length", str(SEQ),
        "--train-iters", str(iters),
        "--lr", "1e-3",
        "--min-lr", "1e-4",
        "--seed", str(SEED),
        "--log-interval", "1",
        "--eval-iters", "0",
        "--kd-alpha", str(KD_ALPHA),
    ]  # fmt: skip
    if parent is not None:
        argv += ["--parent-load", str(ws / parent)]
    if teacher is not None:
        argv += ["--teacher-load", str(ws / teacher)]
    return argv


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """build_workspace's teacher as parent X (with a marker tokenizer file), teacher Y (same config, other
    weights, another marker) and teacher V (vocabulary 256)."""
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.weights import load_config, save_checkpoint

    root = build_workspace(tmp_path_factory.mktemp("parent_and_teacher"))
    (root / "teacher" / "tokenizer_config.json").write_text('{"from": "X"}')
    config = load_config(root / "teacher")
    torch.manual_seed(1)
    save_checkpoint(root / "teacher_y", config, GPTModel(config).state_dict())
    (root / "teacher_y" / "tokenizer_config.json").write_text('{"from": "Y"}')
    wide = ModelConfig.from_dict({**config.to_dict(), "vocab_size": 256})
    torch.manual_seed(2)
    save_checkpoint(root / "teacher_v256", wide, GPTModel(wide).state_dict())
    return root


RUNS = {
    # name: (--parent-load, --teacher-load, extra flags)
    "today": (None, "teacher", []),
    "x_x": ("teacher", "teacher", []),
    "x_y": ("teacher", "teacher_y", ["--save-interval", "1"]),
    "y": (None, "teacher_y", []),
    "x_no_teacher": ("teacher", None, ["--kd-alpha", "0"]),
}


@pytest.fixture(scope="module")
def runs(ws) -> dict[str, tuple[Path, Result]]:
    """Each run of RUNS once, two at a time; x_y also saves (every step, and final_model)."""
    jobs = []
    for name, (parent, teacher, extra) in RUNS.items():
        out = ws / f"run_{name}"
        argv = flags(ws, parent, teacher) + extra + ["--log-dir", str(out)]
        if name == "x_y":
            argv += ["--save", str(out / "ckpt")]
        jobs.append((python_cmd(argv), ws, None, 240, {"record_dir": str(out / "batches")}))
    results = run_many(jobs)
    for (name, _), result in zip(RUNS.items(), results):
        assert result.returncode == 0, f"run {name} failed:\n{result.tail()}"
    return {name: (ws / f"run_{name}", result) for name, result in zip(RUNS, results)}


def first_batches(ws: Path) -> list[torch.Tensor]:
    """The first step's micro-batches of the single-process run, rebuilt as the trainer builds them."""
    from megatron_subnet.data.gpt_dataset import PretrainingSampler, build_train_valid_test_datasets
    from megatron_subnet.training.trainer import micro_batches

    num_samples = (ITERS * GLOBAL, 0, 0)  # --eval-iters 0
    train_ds, _, _ = build_train_valid_test_datasets([str(ws / "data")], SPLIT, SEQ, SEED, num_samples, None)
    batches = micro_batches(train_ds, PretrainingSampler(len(train_ds), 0, MICRO, 0, 1))
    return [next(batches) for _ in range(GLOBAL // MICRO)]


def kl_of_first_step(ws: Path, parent: str, teacher: str) -> tuple[float, float]:
    """(CE, KL) of the first step computed here: the student cut from ``parent`` by subnet.json, ``teacher``
    frozen, averaged over the step's micro-batches (the student does not change within the step)."""
    from megatron_subnet.model.extract import extract_state_dict
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_checkpoint, load_model
    from megatron_subnet.parallel.losses import distillation_loss

    config, state = load_checkpoint(ws / parent)
    student_config, weights = extract_state_dict(config, state, SubnetConfig.load(ws / "subnet.json", config))
    student = GPTModel(student_config)
    student.load_state_dict(weights)
    teacher_model = load_model(ws / teacher).eval()
    ce_sum = kl_sum = 0.0
    batches = first_batches(ws)
    with torch.no_grad():
        for batch in batches:
            tokens, labels = batch[:, :-1], batch[:, 1:]
            _, ce, kl = distillation_loss(student(tokens), labels, teacher_model(tokens), KD_ALPHA)
            ce_sum, kl_sum = ce_sum + ce.item(), kl_sum + kl.item()
    return ce_sum / len(batches), kl_sum / len(batches)


def test_the_student_comes_from_the_parent_and_the_kd_term_from_the_teacher(ws, runs):
    """Parent X with teacher Y vs teacher X: the same step-1 CE (the same student, cut from X), another KD
    term, and each KD term is the KL computed here from the student cut from X and that teacher on the run's
    own first batch (its hash is the one the run recorded). Teacher Y without --parent-load cuts the student
    from Y: another CE."""
    batches = first_batches(ws)
    digest = hashlib.sha1(b"".join(b.numpy().tobytes() for b in batches)).hexdigest()
    for name in ("x_x", "x_y", "y"):
        assert batch_records(runs[name][0] / "batches")[0][1] == digest, name
    x_x, x_y, y = (train_records(runs[name][0])[1] for name in ("x_x", "x_y", "y"))
    assert x_y["ce"] == pytest.approx(x_x["ce"], rel=1e-9, abs=0)
    assert x_y["kd"] > 0 and x_y["kd"] != pytest.approx(x_x["kd"], rel=0.01), (x_x, x_y)
    for record, teacher in ((x_y, "teacher_y"), (x_x, "teacher")):
        ce, kl = kl_of_first_step(ws, "teacher", teacher)
        assert record["ce"] == pytest.approx(ce, rel=1e-5)
        assert record["kd"] == pytest.approx(kl, rel=1e-5, abs=1e-8), (teacher, record, kl)
        assert record["loss"] == pytest.approx((1 - KD_ALPHA) * record["ce"] + KD_ALPHA * record["kd"], rel=1e-6)
    # the parent, not the teacher, is where the student is cut
    assert y["ce"] != pytest.approx(x_y["ce"], rel=1e-5), (x_y, y)


def test_without_parent_load_the_run_is_todays(runs):
    """Leaving out --parent-load is --parent-load = --teacher-load: the same losses (CE and KD parts), learning
    rates and gradient norms, step for step, exactly."""
    today, same = train_records(runs["today"][0]), train_records(runs["x_x"][0])
    assert sorted(today) == sorted(same) == list(range(1, ITERS + 1))
    for key in ("loss", "ce", "kd", "lr", "grad_norm"):
        assert [today[i][key] for i in today] == [same[i][key] for i in same], key


def test_kd_alpha_0_needs_no_teacher_with_a_parent(ws, runs):
    """--kd-alpha 0 with --parent-load and no --teacher-load: no teacher is loaded, the loss is the CE, and
    the step-1 CE is that of the student cut from the parent."""
    records = train_records(runs["x_no_teacher"][0])
    assert sorted(records) == list(range(1, ITERS + 1))
    assert records[1]["kd"] is None and records[1]["loss"] == records[1]["ce"]
    assert records[1]["ce"] == pytest.approx(train_records(runs["x_x"][0])[1]["ce"], rel=1e-9, abs=0)
    output = runs["x_no_teacher"][1].stdout + runs["x_no_teacher"][1].stderr
    assert "teacher: none;" in output


def test_start_up_line_counts_student_parent_and_teacher(ws, runs):
    """The start-up line names the student's, the parent's and the teacher's total and non-embedding
    parameter counts, side by side."""
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.weights import load_config

    student = ModelConfig.from_dict(
        json.loads((runs["x_y"][0] / "ckpt" / "final_model" / "model_config.json").read_text())
    )
    parent = load_config(ws / "teacher")

    def counts(config: ModelConfig) -> str:
        return f"{config.num_parameters():,} parameters ({config.num_parameters(False):,} non-embedding)"

    output = runs["x_y"][1].stdout + runs["x_y"][1].stderr
    # Y has X's config: the same counts, both printed
    expected = f"student: {counts(student)}; parent: {counts(parent)}; teacher: {counts(parent)};"
    assert expected in output, output
    assert student.num_parameters() < parent.num_parameters()
    no_teacher = runs["x_no_teacher"][1]
    assert f"parent: {counts(parent)}; teacher: none;" in no_teacher.stdout + no_teacher.stderr


def test_checkpoint_records_the_parent_and_final_model_has_its_tokenizer(ws, runs):
    """The checkpoint's args hold parent_load (and teacher_load); the final model's tokenizer files are the
    parent's, not the teacher's."""
    save = runs["x_y"][0] / "ckpt"
    meta = json.loads((save / latest_tag(save) / "megatron_subnet.json").read_text())
    assert meta["args"]["parent_load"] == str(ws / "teacher")
    assert meta["args"]["teacher_load"] == str(ws / "teacher_y")
    assert (save / "final_model" / "tokenizer_config.json").read_text() == '{"from": "X"}'


def test_resume_inherits_the_parent_and_refuses_another(ws, runs, tmp_path):
    """Resuming the X/Y run from step 1: without --parent-load it keeps the checkpoint's parent and step 2
    equals the uninterrupted run's exactly (final model with X's tokenizer); --parent-load Y, and another
    --teacher-load, are refused with the change named; with --override-checkpoint-args it runs and logs the change."""
    save = tmp_path / "ckpt"
    shutil.copytree(runs["x_y"][0] / "ckpt", save)
    (save / "latest").write_text("iter_0000001")
    shutil.rmtree(save / "final_model")
    base = flags(ws, None, "teacher_y") + ["--save", str(save), "--load", str(save)]
    other = flags(ws, "teacher_y", "teacher_y") + ["--save", str(save), "--load", str(save)]
    refused = run(python_cmd(other + ["--log-dir", str(tmp_path / "refused")]), tmp_path)
    assert_one_line_error(
        refused, f"--parent-load: {ws / 'teacher'} -> {ws / 'teacher_y'}", "--override-checkpoint-args"
    )
    assert latest_tag(save) == "iter_0000001"
    other_teacher = flags(ws, "teacher", "teacher") + ["--save", str(save), "--load", str(save)]
    refused = run(python_cmd(other_teacher + ["--log-dir", str(tmp_path / "refused_teacher")]), tmp_path)
    assert_one_line_error(
        refused, f"--teacher-load: {ws / 'teacher_y'} -> {ws / 'teacher'}", "--override-checkpoint-args"
    )
    assert latest_tag(save) == "iter_0000001"

    resumed = ok(run(python_cmd(base + ["--log-dir", str(tmp_path / "a")]), tmp_path))
    reference = train_records(runs["x_y"][0])
    records = train_records(tmp_path / "a")
    assert sorted(records) == [2], resumed.tail()
    for key in ("loss", "ce", "kd", "grad_norm", "lr"):
        assert records[2][key] == reference[2][key], key
    assert (save / "final_model" / "tokenizer_config.json").read_text() == '{"from": "X"}'
    meta = json.loads((save / "iter_0000002" / "megatron_subnet.json").read_text())
    assert meta["args"]["parent_load"] == str(ws / "teacher")

    (save / "latest").write_text("iter_0000001")
    overridden = ok(run(python_cmd(other + ["--override-checkpoint-args", "--log-dir", str(tmp_path / "b")]), tmp_path))
    assert f"--parent-load: {ws / 'teacher'} -> {ws / 'teacher_y'}" in overridden.stdout + overridden.stderr
    assert sorted(train_records(tmp_path / "b")) == [2]
    assert (save / "final_model" / "tokenizer_config.json").read_text() == '{"from": "Y"}'


def test_bad_parent_or_teacher_is_one_line(ws, tmp_path):
    """A teacher of vocabulary 256 for a student of the parent's 128, a missing --parent-load, and a
    --parent-load inside --save's final_model: exit 2, one 'error:' line naming the flags (and the sizes)."""
    save = tmp_path / "ckpt"
    (save / "final_model").mkdir(parents=True)
    for name in ("model_config.json", "model.safetensors"):
        shutil.copy(ws / "teacher" / name, save / "final_model" / name)
    nested = flags(ws, None, "teacher") + ["--parent-load", str(save / "final_model"), "--save", str(save)]
    cases = {
        "vocab": (
            flags(ws, "teacher", "teacher_v256"),
            ("--teacher-load", str(ws / "teacher_v256"), "256", "--parent-load", str(ws / "teacher"), "128"),
        ),
        "missing": (flags(ws, "nope", "teacher"), (f"--parent-load {ws / 'nope'}", "no such file")),
        "nested": (nested + ["--overwrite"], ("--save", "--parent-load", "final_model")),
    }
    jobs = [(python_cmd(argv + ["--log-dir", str(tmp_path / n)]), tmp_path, None, 120, None) for n, (argv, _) in
            cases.items()]  # fmt: skip
    for (name, (_, needles)), result in zip(cases.items(), run_many(jobs)):
        line = assert_one_line_error(result, *needles)
        assert "megatron_subnet/" not in result.stderr, (name, line)
    assert sorted(p.name for p in (save / "final_model").iterdir()) == ["model.safetensors", "model_config.json"]


def test_parent_load_flag_checks_in_process(ws, tmp_path):
    """Without a run: --init subnet with only --parent-load is valid at --kd-alpha 0; --kd-alpha > 0 with only
    --parent-load still needs --teacher-load; the parent is an input of the output checks."""
    from megatron_subnet.arguments import ArgumentError, parse_config
    from megatron_subnet.outputs import OutputError
    from megatron_subnet.training.preflight import check_outputs, resolve_parent

    config = parse_config(flags(ws, "teacher", None) + ["--kd-alpha", "0"])
    assert resolve_parent(config, None) == (str(ws / "teacher"), None)
    with pytest.raises(ArgumentError, match="--kd-alpha 0.5 needs a teacher .--teacher-load"):
        parse_config(flags(ws, "teacher", None))
    with pytest.raises(ArgumentError, match="--init subnet needs --teacher-load .or --parent-load. and --subnet"):
        parse_config(flags(ws, None, None) + ["--kd-alpha", "0"])
    default = parse_config(flags(ws, None, "teacher_y"))
    assert resolve_parent(default, None) == (str(ws / "teacher_y"), None)
    # resuming without --parent-load: the checkpoint's parent; an old checkpoint's parent was its teacher
    assert resolve_parent(default, {"args": {"parent_load": str(ws / "teacher")}}) == (str(ws / "teacher"), None)
    assert resolve_parent(default, {"args": {"teacher_load": str(ws / "teacher")}}) == (str(ws / "teacher"), None)
    explicit = parse_config(flags(ws, "teacher_y", "teacher_y"))
    assert resolve_parent(explicit, {"args": {"parent_load": str(ws / "teacher")}})[1] == (
        f"--parent-load: {ws / 'teacher'} -> {ws / 'teacher_y'}"
    )

    save = tmp_path / "ckpt"
    (save / "final_model").mkdir(parents=True)
    config = parse_config(flags(ws, None, "teacher") + ["--save", str(save), "--overwrite"])
    nested = config.replace("model", parent_load=str(save / "final_model" / "sub"))
    with pytest.raises(OutputError, match="--parent-load"):
        check_outputs(nested, save, None, None)
    same = config.replace("model", parent_load=config.distill.teacher_load)
    assert check_outputs(same, save, None, None) is False
