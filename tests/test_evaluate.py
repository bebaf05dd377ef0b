"""tools/evaluate.py and megatron_subnet.model.evaluation: loss against hand-computed cross-entropy,
masked vs extracted sub-networks, ours vs transformers, and one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_importance import LLAMA, NEOX, VOCAB, tiny_checkpoint, tiny_dataset, tiny_model

from megatron_subnet.data.batches import load_batches
from megatron_subnet.data.gpt_dataset import build_train_valid_test_datasets
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.hf import save_hf
from megatron_subnet.model.importance import compute_importance
from megatron_subnet.model.subnet import SubnetConfig, extract_state_dict
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


def test_batches_come_from_the_requested_split(tmp_path):
    data = tiny_dataset(tmp_path / "d")
    batches = load_batches([data], SPLIT, "valid", SEQ, MBS, ITERS, 1234)
    assert len(batches) == ITERS and all(b.shape == (MBS, SEQ + 1) and b.dtype == torch.int64 for b in batches)
    assert not torch.equal(batches[0], load_batches([data], SPLIT, "train", SEQ, MBS, ITERS, 1234)[0])


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "gpt_neox"])
def test_masked_subnet_equals_extracted_student(tmp_path, arch):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**arch)).eval()
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


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "gpt_neox"])
def test_ours_and_transformers_give_the_same_loss(tmp_path, arch):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**arch)).eval()
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
        (["--load", small, "--data-path", data], "vocab size"),
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
