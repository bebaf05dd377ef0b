"""tools/evaluate.py and megatron_subnet.model.evaluation: loss against hand-computed cross-entropy,
masked vs extracted sub-networks, ours vs transformers, and one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_importance import VOCAB, tiny_checkpoint, tiny_dataset, tiny_model

from megatron_subnet.data.batches import load_batches
from megatron_subnet.data.gpt_dataset import build_train_valid_test_datasets
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.extract import extract_state_dict
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.hf import save_hf
from megatron_subnet.model.importance import compute_importance
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import save_checkpoint
from tools.evaluate import main as evaluate_main

ROOT = Path(__file__).resolve().parents[1]
SEQ, MBS, ITERS, SPLIT = 16, 2, 3, "70,30,0"


@pytest.fixture
def setup(tmp_path):
    model = tiny_model()
    return model, tiny_checkpoint(tmp_path / "ckpt", model), tiny_dataset(tmp_path / "data" / "d")


def run(tmp_path, load, data, *extra) -> dict:
    out = tmp_path / "result.jsonl"
    out.unlink(missing_ok=True)
    args = ["--load", str(load), "--data-path", data, "--split", SPLIT, "--seq-length", str(SEQ),
            "--micro-batch-size", str(MBS), "--eval-iters", str(ITERS), "--output", str(out), *extra]
    assert evaluate_main(args) == 0
    return json.loads(out.read_text())


def test_loss_is_the_cross_entropy_of_the_split_samples(tmp_path, setup, capsys):
    model, ckpt, data = setup
    result = run(tmp_path, ckpt, data)
    assert "perplexity" in capsys.readouterr().out
    _, valid, _ = build_train_valid_test_datasets(data, SPLIT, SEQ, 1234, [0, MBS * ITERS, 0])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(MBS * ITERS):
            tokens = torch.from_numpy(valid[i]["tokens"].astype(np.int64))
            logp = torch.log_softmax(model(tokens[None, :-1])[0].double(), dim=-1)
            total -= float(logp.gather(1, tokens[1:, None]).sum())
            count += SEQ
    assert result["tokens"] == count == MBS * ITERS * SEQ
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["non_embedding_params"] == model.config.num_parameters(include_embeddings=False)
    # another split and seed give other samples
    assert run(tmp_path, ckpt, data, "--split-name", "train", "--seed", "7")["loss"] != result["loss"]


def test_evaluate_is_token_weighted_and_silent_without_progress(capsys):
    """The one evaluation definition (tools, trainer, search fitness): the cross-entropy summed over every label
    token divided by their number, so batches of different sizes weigh by their tokens; progress=False prints
    nothing."""
    from megatron_subnet.model.evaluation import evaluate
    from megatron_subnet.search.fitness import SubnetFitness

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (1, 9), generator=g), torch.randint(0, VOCAB, (3, 9), generator=g)]
    with torch.no_grad():
        sums = [F.cross_entropy(model(b[:, :-1]).flatten(0, 1).double(), b[:, 1:].flatten(), reduction="sum")
                for b in batches]  # fmt: skip
    result = evaluate(model, batches, progress=False)
    assert result.tokens == 4 * 8
    assert result.loss == pytest.approx(float(sum(sums)) / 32, rel=1e-6)
    assert result.loss != pytest.approx(float(sums[0] / 8 + sums[1] / 24) / 2, rel=1e-4)  # not a mean of batch means
    fitness = SubnetFitness(model, batches).loss(SubnetConfig.full(model.config))
    assert fitness == pytest.approx(result.loss, rel=1e-6)
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_batches_come_from_the_requested_split(tmp_path):
    data = tiny_dataset(tmp_path / "d")
    batches = load_batches([data], SPLIT, "valid", SEQ, MBS, ITERS, 1234)
    assert len(batches) == ITERS and all(b.shape == (MBS, SEQ + 1) and b.dtype == torch.int64 for b in batches)
    assert not torch.equal(batches[0], load_batches([data], SPLIT, "train", SEQ, MBS, ITERS, 1234)[0])


def test_masked_subnet_equals_extracted_student(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**tiny_config)).eval()
    ckpt = tiny_checkpoint(tmp_path / "parent", model)
    data = tiny_dataset(tmp_path / "d")
    c = model.config
    subnet = SubnetConfig(
        layers=[0, 2], hidden=sorted([*range(0, 32, 2), 1, 3]),
        heads=[[0, 1], [2, 3]] if c.layer_query_groups(0) == 2 else [[1, 3], [0, 2]],
        query_groups=[[0], [1]] if c.layer_query_groups(0) == 2 else [[1, 3], [0, 2]],
        mlp=[list(range(0, c.layer_ffn(0), 3)), list(range(1, 20))],
    )
    subnet.save(tmp_path / "subnet.json")
    student_config, student_state = extract_state_dict(c, model.state_dict(), subnet)
    save_checkpoint(tmp_path / "student", student_config, student_state)
    masked = run(tmp_path, ckpt, data, "--subnet", str(tmp_path / "subnet.json"))
    extracted = run(tmp_path, tmp_path / "student", data)
    assert masked["loss"] == pytest.approx(extracted["loss"], rel=1e-5, abs=1e-6)
    assert masked["non_embedding_params"] == extracted["non_embedding_params"]
    assert masked["loss"] != pytest.approx(run(tmp_path, ckpt, data)["loss"], rel=1e-3)


def test_subnet_counts_in_importance_order(tmp_path, setup):
    model, ckpt, data = setup
    importance = compute_importance(model, load_batches([data], SPLIT, "train", SEQ, MBS, 2, 1234), progress=False)
    importance.save(tmp_path / "imp.safetensors")
    (tmp_path / "counts.json").write_text(json.dumps({"num_layers": 3, "hidden_size": 24, "order": "importance"}))
    result = run(tmp_path, ckpt, data, "--subnet", str(tmp_path / "counts.json"),
                 "--importance", str(tmp_path / "imp.safetensors"), "--layer-metric", "drop_loss")
    subnet = SubnetConfig.from_counts(model.config, num_layers=3, hidden_size=24,
                                      importance=importance.with_layer_metric("drop_loss"))
    student_config, student_state = extract_state_dict(model.config, model.state_dict(), subnet)
    save_checkpoint(tmp_path / "student", student_config, student_state)
    assert result["loss"] == pytest.approx(run(tmp_path, tmp_path / "student", data)["loss"], rel=1e-5)


def test_ours_and_transformers_give_the_same_loss(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**tiny_config)).eval()
    save_hf(tmp_path / "hf", model.config, model.state_dict())
    data = tiny_dataset(tmp_path / "d")
    ours_from_hf = run(tmp_path, tmp_path / "hf", data)
    theirs = run(tmp_path, tmp_path / "hf", data, "--hf")
    assert theirs["model"] == "transformers" and ours_from_hf["model"] == "ours"
    assert ours_from_hf["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", model)
    assert run(tmp_path, ckpt, data)["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert run(tmp_path, ckpt, data, "--hf")["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_errors_are_one_line(tmp_path, setup, capsys):
    model, ckpt, data = setup
    (tmp_path / "bad_subnet.json").write_text('{"num_layers": 9}')
    small = tiny_checkpoint(tmp_path / "small_vocab", tiny_model(vocab_size=VOCAB // 4))
    cases = [
        (["--load", str(tmp_path / "nope"), "--data-path", data], "no such file"),
        (["--load", str(tmp_path / "data"), "--data-path", data], "not a checkpoint"),
        (["--load", ckpt, "--data-path", str(tmp_path / "nodata")], "no such file"),
        (["--load", ckpt, "--data-path", data, "--split-name", "test"], "no test documents"),
        (["--load", ckpt, "--data-path", data, "--subnet", str(tmp_path / "bad_subnet.json")], "num_layers 9"),
        (["--load", ckpt, "--data-path", data, "--subnet", str(tmp_path / "none.json")], "invalid sub-network"),
        (["--load", ckpt, "--data-path", data, "--subnet", str(tmp_path / "bad_subnet.json"),
          "--importance", str(tmp_path / "none.safetensors")], "cannot read importance"),
        (["--load", small, "--data-path", data], "outside the model's vocabulary"),
    ]
    common = ["--split", SPLIT, "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--eval-iters", "2"]
    for args, message in cases:
        assert evaluate_main(args + common) == 1, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--load", str(tmp_path / "nope"),
                           "--data-path", data, *common], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and len(proc.stderr.splitlines()) == 1
    with pytest.raises(SystemExit):
        evaluate_main(["--load", ckpt, "--data-path", data, "--hf", "--subnet", "x.json"])


# ---------------------------------------------------------------------- issue 8: checked first, nothing silently wrong


def _digest(*roots) -> dict[str, str]:
    import hashlib

    out = {}
    for root in map(Path, roots):
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _one_error_line(capsys, *texts) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert all(t in lines[0] for t in texts), (texts, lines[0])
    return lines[0]


def nan_checkpoint(directory: Path) -> str:
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layers.1.mlp.linear_fc2.weight"][0, 0] = float("nan")
    save_checkpoint(directory, model.config, state)
    return str(directory)


def test_bad_flags_and_outputs_are_refused_before_any_work(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tiny_model(max_position_embeddings=12))
    data = tiny_dataset(tmp_path / "data" / "d")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "results.jsonl").write_text('{"loss": 1.0}\n')
    (Path(ckpt) / "model.safetensors").write_bytes(b"truncated")  # loading the weights would fail: none of these do
    base = ["--load", ckpt, "--data-path", data, "--split", SPLIT, "--micro-batch-size", str(MBS)]
    cases = [
        (["--seq-length", "0"], 2, ["--seq-length", "'0'"]),
        (["--eval-iters", "-1"], 2, ["--eval-iters", "'-1'"]),
        (["--micro-batch-size", "1.5"], 2, ["--micro-batch-size", "'1.5'"]),
        (["--seed", "-3"], 2, ["--seed", "'-3'"]),
        (["--device", "cuda:99"], 1, ["--device cuda:99"]),
        (["--device", "tpu"], 1, ["--device tpu"]),
        (["--seq-length", "16"], 1, ["--seq-length 16", "max_position_embeddings 12"]),
        (["--output", str(tmp_path / "outdir")], 1, ["--output", "is a directory"]),
        (["--output", str(Path(ckpt) / "eval.jsonl")], 1, ["--output", "lies inside the input --load"]),
        (["--output", data + ".bin"], 1, ["--output", "is the input --data-path"]),
        (["--output", str(tmp_path / "notes.txt" / "r.jsonl")], 1, ["--output"]),
        (["--seq-length", "8", "--subnet", str(tmp_path / "bad_subnet.json")], 1, ["bad_subnet.json", "num_layers"]),
    ]
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    (tmp_path / "bad_subnet.json").write_text('{"num_layers": true}')
    before = _digest(tmp_path)
    for extra, code, texts in cases:
        try:
            rc = evaluate_main([*base, *extra])
        except SystemExit as e:
            rc = e.code
        assert rc == code, (extra, capsys.readouterr().err)
        _one_error_line(capsys, *texts)
        assert _digest(tmp_path) == before, extra  # nothing written, nothing appended, inputs intact


def test_seq_length_beyond_a_hugging_face_models_positions_is_an_error(tmp_path, capsys):
    model = tiny_model(max_position_embeddings=12)
    save_hf(tmp_path / "hf", model.config, model.state_dict())
    data = tiny_dataset(tmp_path / "d")
    common = ["--load", str(tmp_path / "hf"), "--data-path", data, "--split", SPLIT, "--seq-length", "16",
              "--micro-batch-size", "2", "--eval-iters", "1", "--output", str(tmp_path / "r.jsonl")]
    for extra in ([], ["--hf"]):
        assert evaluate_main(common + extra) == 1
        _one_error_line(capsys, "--seq-length 16", "max_position_embeddings 12")
    assert not (tmp_path / "r.jsonl").exists()


def test_a_non_finite_loss_fails_and_appends_nothing(tmp_path, capsys):
    ckpt = nan_checkpoint(tmp_path / "nan")
    data = tiny_dataset(tmp_path / "d")
    out = tmp_path / "results.jsonl"
    out.write_text('{"loss": 1.0}\n')
    args = ["--load", ckpt, "--data-path", data, "--split", SPLIT, "--seq-length", str(SEQ),
            "--micro-batch-size", str(MBS), "--eval-iters", "1", "--output", str(out)]
    assert evaluate_main(args) == 1
    _one_error_line(capsys, f"--load {ckpt}", "not finite", "nothing was appended")
    assert out.read_text() == '{"loss": 1.0}\n'


@pytest.mark.slow
def test_a_subprocess_run_prints_one_line_and_no_traceback(tmp_path):
    data = tiny_dataset(tmp_path / "d")
    ckpt = nan_checkpoint(tmp_path / "nan")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--split", SPLIT, "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--eval-iters", "1"]
    for extra, code in ((["--load", ckpt], 1), (["--load", ckpt, "--device", "cuda:99"], 1),
                        (["--load", ckpt, "--seq-length", "nan"], 2)):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--data-path", data,
                               *common, *extra], capture_output=True, text=True, env=env)
        assert proc.returncode == code, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
