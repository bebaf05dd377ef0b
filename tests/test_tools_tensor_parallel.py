"""The tools under tensor parallelism (issue 9): checkpoints resharded between any TP sizes bit for bit, and
tools/evaluate.py, tools/compute_importance.py and tools/search_subnet.py under torchrun at TP=2 (and TP=2 x
DP=2) giving a single process's results; the distilled search fitness and importance at TP=2 in-process;
one-line errors for a TP size the model cannot take and for TP without a launcher.

The real teacher at TP=3 is in test_teacher.py (it shares that file's cached checkpoint)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_subnet.data.batches import load_batches
from megatron_subnet.data.indexed import IndexedDatasetBuilder
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.extract import extract_state_dict
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.importance import compute_importance, load_importance
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import (
    CheckpointReader,
    load_checkpoint,
    save_checkpoint,
    shard_state_dict,
)
from megatron_subnet.parallel.layers import TPShard
from megatron_subnet.search.evolution import read_results
from tests.distributed import run_distributed
from tests.tiny_models import tiny
from tests.training_utils import REPO, run, spawn_cmd, torchrun_cmd
from tools.compute_importance import main as importance_main
from tools.convert_checkpoint import main as convert_main
from tools.evaluate import main as evaluate_main
from tools.search_subnet import main as search_main

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

VOCAB = 64
SPLIT, SEQ, MBS = "80,20,0", "16", "2"
PARENT = tiny(
    "llama", vocab_size=VOCAB, hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=2, head_dim=8,
    ffn_hidden_size=48, tie_word_embeddings=True, init_std=0.3,
)
NEOX = tiny(
    "gpt_neox", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=4,
    head_dim=8, ffn_hidden_size=40, rotary_pct=0.5, init_std=0.3,
)


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Large random weights with random norms and biases, so that every index matters."""
    torch.manual_seed(seed)
    model = GPTModel(config, TPShard())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """A tiny llama parent saved consolidated and at TP=2, and a dataset of random tokens."""
    root = tmp_path_factory.mktemp("tp_tools")
    config = ModelConfig(**PARENT)
    state = random_weights(config)
    save_checkpoint(root / "ckpt", config, state)
    save_checkpoint(root / "ckpt_tp2", config, state, tensor_parallel_size=2)
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(root / "data", np.uint16) as builder:
        for n in rng.integers(10, 81, size=60):
            builder.add_document(rng.integers(0, VOCAB, size=n))
    return SimpleNamespace(root=root, config=config, state=state, ckpt=str(root / "ckpt"),
                           ckpt_tp2=str(root / "ckpt_tp2"), data=str(root / "data"))  # fmt: skip


def torchrun(nproc: int, tool: str, args: list[str], cwd: Path, timeout: float = 150, launcher=spawn_cmd):
    """``tool`` on ``nproc`` processes (``launcher``: ``torchrun_cmd`` for the user's command line itself)."""
    result = run(launcher(nproc, [str(a) for a in args], script=REPO / "tools" / tool), cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.tail()
    return result


def _one_error_line(capsys, *texts) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert all(t in lines[0] for t in texts), (texts, lines[0])
    return lines[0]


def _exit_code(main, argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------------- checkpoints: import, reshard, export


def test_import_reshard_export_round_trip_is_bit_exact(tmp_path, capsys):
    """HF -> import at TP=2 -> reshard to TP=4 -> reshard to TP=1 -> export: the HF tensors, bit for bit; export and
    extract read sharded inputs; extract writes student shards."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                            tie_word_embeddings=False)  # fmt: skip
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")

    steps = [
        (["import", "--input", tmp_path / "hf", "--output", tmp_path / "tp2", "--tensor-model-parallel-size", "2"],
         "tp2", 2),
        (["reshard", "--input", tmp_path / "tp2", "--output", tmp_path / "tp4", "--tensor-model-parallel-size", "4"],
         "tp4", 4),
        (["reshard", "--input", tmp_path / "tp4", "--output", tmp_path / "tp1", "--tensor-model-parallel-size", "1"],
         "tp1", 1),
    ]  # fmt: skip
    for argv, name, size in steps:
        assert convert_main([str(a) for a in argv]) == 0, capsys.readouterr().err
        files = sorted(p.name for p in (tmp_path / name).glob("*.safetensors"))
        assert files == (["model.safetensors"] if size == 1 else [f"mp_rank_{r:02d}.safetensors" for r in range(size)])
    config, state = load_checkpoint(tmp_path / "tp1")
    for size in (2, 4):  # each shard file holds exactly that rank's chunk
        for rank in range(size):
            shard = load_file(tmp_path / f"tp{size}" / f"mp_rank_{rank:02d}.safetensors")
            expected = shard_state_dict(config, state, TPShard(rank, size))
            assert shard.keys() == expected.keys() and all(torch.equal(shard[k], expected[k]) for k in shard)
    for src in ("tp1", "tp4"):  # export from the consolidated and from the 4-way sharded checkpoint
        assert convert_main(["export", "--input", str(tmp_path / src), "--output", str(tmp_path / f"hf_{src}")]) == 0
        exported = load_file(tmp_path / f"hf_{src}" / "model.safetensors")
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k], original[k]) for k in original), src
    capsys.readouterr()

    # extract from the 4-way shards, written as 2 student shards == extract_state_dict of the whole parent
    subnet = SubnetConfig(layers=[0, 1], hidden=list(range(1, 32, 2)), heads=[[1, 4], [2, 3, 6, 7]],
                          query_groups=[[0, 2], [1, 3]], mlp=[list(range(0, 64, 2)), list(range(16, 48))])  # fmt: skip
    subnet.save(tmp_path / "subnet.json")
    argv = ["extract", "--input", tmp_path / "tp4", "--subnet", tmp_path / "subnet.json", "--output",
            tmp_path / "student", "--tensor-model-parallel-size", "2"]  # fmt: skip
    assert convert_main([str(a) for a in argv]) == 0
    assert "2 tensor-parallel shards" in capsys.readouterr().out
    student_config, expected = extract_state_dict(config, state, subnet)
    with CheckpointReader(tmp_path / "student") as reader:
        assert reader.tp_size == 2 and reader.config == student_config
        got = reader.read_all()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    # resharding a student keeps the sub-network it was cut by
    argv = ["reshard", "--input", tmp_path / "student", "--output", tmp_path / "student_tp1",
            "--tensor-model-parallel-size", "1"]  # fmt: skip
    assert convert_main([str(a) for a in argv]) == 0
    assert json.loads((tmp_path / "student_tp1" / "subnet.json").read_text()) == subnet.to_dict()


def test_sizes_the_model_cannot_take_and_tp_without_a_launcher_are_one_line_errors(ws, tmp_path, capsys):
    odd = ModelConfig(**{**PARENT, "hidden_size": 48, "num_attention_heads": 6, "num_query_groups": 3})  # not TP=2
    save_checkpoint(tmp_path / "odd", odd, random_weights(odd))
    for name, changes in (("vocab", dict(vocab_size=VOCAB + 2)), ("ffn", dict(ffn_hidden_size=50))):
        config = ModelConfig(**{**PARENT, "num_attention_heads": 4, "num_query_groups": 4, **changes})
        save_checkpoint(tmp_path / name, config, random_weights(config))
    from megatron_subnet.model.hf import save_hf

    save_hf(tmp_path / "hf_odd", odd, random_weights(odd))
    one_group = SubnetConfig.from_counts(ws.config, num_attention_heads=2, num_query_groups=1)
    one_group.save(tmp_path / "one_group.json")
    out = tmp_path / "out"
    convert_cases = [
        (["reshard", "--input", tmp_path / "odd", "--output", out, "--tensor-model-parallel-size", "2"],
         ["--tensor-model-parallel-size 2", "num_query_groups 3 is not divisible by --tensor-model-parallel-size 2"]),
        (["reshard", "--input", tmp_path / "vocab", "--output", out, "--tensor-model-parallel-size", "4"],
         ["vocab_size 66 is not divisible by --tensor-model-parallel-size 4"]),
        (["reshard", "--input", tmp_path / "ffn", "--output", out, "--tensor-model-parallel-size", "4"],
         ["layer 0: ffn_hidden_size 50 is not divisible by --tensor-model-parallel-size 4"]),
        (["import", "--input", tmp_path / "hf_odd", "--output", out, "--tensor-model-parallel-size", "2"],
         ["hf_odd cannot be split", "num_query_groups 3 is not divisible by --tensor-model-parallel-size 2"]),
        (["extract", "--input", ws.ckpt_tp2, "--subnet", tmp_path / "one_group.json", "--output", out,
          "--tensor-model-parallel-size", "2"], ["the student of --subnet", "num_query_groups 1 is not divisible"]),
        (["reshard", "--input", ws.ckpt, "--output", out, "--tensor-model-parallel-size", "0"],
         ["--tensor-model-parallel-size", "'0'"]),
        (["reshard", "--input", ws.ckpt, "--output", out], ["--tensor-model-parallel-size"]),
    ]  # fmt: skip
    for argv, texts in convert_cases:
        assert _exit_code(convert_main, argv) == 2, argv
        _one_error_line(capsys, *texts)
        assert not out.exists()

    data = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS]
    search = [*data, "--target-params", "0.5", "--output", out]
    tp2 = ["--tensor-model-parallel-size", "2"]
    cases = [
        (evaluate_main, ["--load", tmp_path / "odd", *data, *tp2], 1,
         ["--load", "cannot be split into 2 tensor-parallel shards", "num_query_groups 3 is not divisible"]),
        (importance_main, ["--load", tmp_path / "odd", *data, *tp2, "--output", out / "i.safetensors"], 1,
         ["num_query_groups 3 is not divisible by --tensor-model-parallel-size 2"]),
        (search_main, ["--load", tmp_path / "odd", *search, *tp2], 1, ["num_query_groups 3 is not divisible"]),
        (evaluate_main, ["--load", ws.ckpt_tp2, *data, *tp2], 1, ["needs that many processes", "torchrun"]),
        (importance_main, ["--load", ws.ckpt, *data, *tp2, "--output", out / "i.safetensors"], 1,
         ["--tensor-model-parallel-size 2", "torchrun --nproc-per-node 2"]),
        (search_main, ["--load", ws.ckpt_tp2, *search, *tp2], 1, ["needs that many processes"]),
        (evaluate_main, ["--load", ws.ckpt, *data, "--hf", *tp2], 2, ["--hf", "--tensor-model-parallel-size 2"]),
        (search_main, ["--load", ws.ckpt, *search, *tp2, "--fitness-train-steps", "1"], 2,
         ["--fitness-train-steps", "--divisible-by a multiple of 2"]),
    ]  # fmt: skip
    for main, argv, code, texts in cases:
        assert _exit_code(main, argv) == code, argv
        _one_error_line(capsys, *texts)
        assert not out.exists()


# ---------------------------------------------------------------------- the tools under torchrun


def test_evaluate_at_tp2_equals_one_process(ws, tmp_path):
    common = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS,
              "--eval-iters", "3"]  # fmt: skip
    assert evaluate_main(["--load", ws.ckpt, *common, "--output", str(tmp_path / "tp1.jsonl")]) == 0
    assert evaluate_main(["--load", ws.ckpt_tp2, *common, "--output", str(tmp_path / "tp1.jsonl")]) == 0
    tp1, tp1_from_shards = [json.loads(line) for line in (tmp_path / "tp1.jsonl").read_text().splitlines()]
    assert tp1_from_shards["loss"] == tp1["loss"]  # one process reading the TP=2 files: the same weights
    tp2_args = ["--load", ws.ckpt_tp2, *common, "--tensor-model-parallel-size", "2", "--output", tmp_path / "tp2.jsonl"]
    result = torchrun(2, "evaluate.py", tp2_args, tmp_path, launcher=torchrun_cmd)  # the user's command line
    lines = (tmp_path / "tp2.jsonl").read_text().splitlines()
    assert len(lines) == 1, lines  # rank 0 alone appends
    tp2 = json.loads(lines[0])
    assert tp2["tensor_model_parallel_size"] == 2 and tp2["tokens"] == tp1["tokens"] == 3 * 2 * 16
    assert tp2["loss"] == pytest.approx(tp1["loss"], rel=1e-6)
    printed = [line for line in result.stdout.splitlines() if line.startswith("loss ")]
    assert len(printed) == 1, result.stdout
    assert float(printed[0].split()[1]) == pytest.approx(tp1["loss"], rel=1e-6), result.stdout  # printed to 6 digits


def test_importance_at_tp2_equals_one_process(ws, tmp_path):
    """A consolidated --load read at TP=2 (each rank its slices): the same scores as one process."""
    common = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS,
              "--calib-iters", "2", "--drop-loss-iters", "1"]  # fmt: skip
    assert importance_main(["--load", ws.ckpt, *common, "--output", str(tmp_path / "tp1.safetensors")]) == 0
    torchrun(2, "compute_importance.py", ["--load", ws.ckpt, *common, "--tensor-model-parallel-size", "2",
                                          "--output", tmp_path / "tp2.safetensors"], tmp_path)  # fmt: skip
    tp1 = load_file(tmp_path / "tp1.safetensors")
    tp2 = load_file(tmp_path / "tp2.safetensors")
    assert tp1.keys() == tp2.keys() and {"drop_loss", "block", "hidden", "heads.0", "mlp.2"} <= tp1.keys()
    for name in tp1:
        torch.testing.assert_close(tp2[name], tp1[name], rtol=1e-5, atol=1e-5, msg=name)
    assert load_importance(tmp_path / "tp2.safetensors", parent=ws.config).metadata["num_tokens"] == str(2 * 2 * 16)


def _search_records(output: Path) -> list[tuple]:
    records = read_results(output / "results.jsonl")
    return [(r["generation"], r["key"], r["params"], json.dumps(r["config"])) for r in records]


def test_search_at_tp2_and_tp2_dp2_equals_one_process(ws, tmp_path):
    """Same seed and budget: the same candidates, fitness within 1e-5 and best sub-network at TP=1, TP=2 (on the
    TP=2 checkpoint) and TP=2 x DP=2; with --divisible-by 2 every candidate's groups, heads and MLP split in two."""
    common = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS,
              "--fitness-batches", "2", "--space", "per_layer", "--target-params", "0.5", "--tolerance", "0.1",
              "--population", "6", "--elite", "1", "--generations", "2", "--divisible-by", "2"]  # fmt: skip
    assert search_main(["--load", ws.ckpt, *common, "--output", str(tmp_path / "tp1")]) == 0
    torchrun(2, "search_subnet.py", ["--load", ws.ckpt_tp2, *common, "--tensor-model-parallel-size", "2",
                                     "--output", tmp_path / "tp2"], tmp_path)  # fmt: skip
    torchrun(4, "search_subnet.py", ["--load", ws.ckpt_tp2, *common, "--tensor-model-parallel-size", "2",
                                     "--output", tmp_path / "tp2dp2"], tmp_path)  # fmt: skip
    reference = read_results(tmp_path / "tp1" / "results.jsonl")
    assert len(reference) == 6 + 5
    for config in (r["config"] for r in reference):
        for key in ("num_query_groups", "num_attention_heads", "ffn_hidden_size"):
            values = config[key] if isinstance(config[key], list) else [config[key]]
            assert all(v % 2 == 0 for v in values), (key, config)
    for run_dir in ("tp2", "tp2dp2"):
        got = read_results(tmp_path / run_dir / "results.jsonl")
        assert _search_records(tmp_path / run_dir) == _search_records(tmp_path / "tp1"), run_dir
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in reference], rtol=1e-5, atol=0)
        best = (tmp_path / run_dir / "best_subnet.json").read_text()
        assert best == (tmp_path / "tp1" / "best_subnet.json").read_text(), run_dir


def test_search_with_distilled_fitness_at_tp2_equals_one_process(ws, tmp_path):
    """--fitness-train-steps at TP=2 (each rank cuts its student shards from --load's file, --divisible-by 2)."""
    common = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS,
              "--fitness-batches", "1", "--target-params", "0.5", "--tolerance", "0.1", "--population", "4",
              "--elite", "1", "--generations", "1", "--divisible-by", "2", "--fitness-train-steps", "2",
              "--fitness-lr", "1e-3"]  # fmt: skip
    assert search_main(["--load", ws.ckpt, *common, "--output", str(tmp_path / "tp1")]) == 0
    torchrun(2, "search_subnet.py", ["--load", ws.ckpt, *common, "--tensor-model-parallel-size", "2",
                                     "--output", tmp_path / "tp2"], tmp_path)  # fmt: skip
    assert _search_records(tmp_path / "tp2") == _search_records(tmp_path / "tp1")
    losses = {d: [r["loss"] for r in read_results(tmp_path / d / "results.jsonl")] for d in ("tp1", "tp2")}
    np.testing.assert_allclose(losses["tp2"], losses["tp1"], rtol=1e-5)


# ---------------------------------------------------------------------- in-process: distilled fitness, importance


def _fitness(rank: int, ckpt: str, data: str, subnets: list[SubnetConfig], steps: int) -> list[float]:
    from megatron_subnet.search.fitness import FitnessConfig, SubnetFitness, load_parent

    parent = load_parent(ckpt)
    valid = load_batches(data, SPLIT, "valid", int(SEQ), int(MBS), 2, 1234)
    train = load_batches(data, SPLIT, "train", int(SEQ), int(MBS), 2, 1234)
    config = FitnessConfig(train_steps=steps, lr=1e-3)
    reader = CheckpointReader(ckpt) if parent.shard.size > 1 else None
    fitness = SubnetFitness(parent, valid, train, config, read=reader.read if reader else None)
    return [fitness.loss(s) for s in subnets]


def _fitness_both(rank: int, ckpt: str, data: str, masked: list, distilled: list) -> tuple[list, list]:
    return _fitness(rank, ckpt, data, masked, 0), _fitness(rank, ckpt, data, distilled, 2)


def test_search_fitness_at_tp2_equals_one_process(ws):
    """Masked fitness on uneven selections (some rank keeps no head or no neuron), and the distilled fitness
    (--fitness-train-steps): each rank reads its student shard from the checkpoint file and trains it sharded."""
    from tests.test_subnet import random_subnet

    config, rng = ws.config, random.Random(0)
    masked = [random_subnet(config, rng) for _ in range(4)]
    masked.append(SubnetConfig(layers=[0, 1, 2], hidden=list(range(32)), heads=[[0], [3], [0, 1]],
                               query_groups=[[0], [1], [0]],
                               mlp=[list(range(24)), list(range(24, 48)), [0]]))  # fmt: skip
    distilled = [
        SubnetConfig.from_counts(config, num_layers=2, hidden_size=24, num_attention_heads=2, num_query_groups=2,
                                 ffn_hidden_size=32),
        SubnetConfig(layers=[0, 2], hidden=list(range(0, 32, 2)), heads=[[1, 2], [0, 1, 2, 3]],
                     query_groups=[[0, 1], [0, 1]], mlp=[list(range(5, 37)), list(range(0, 48, 3))]),
    ]  # fmt: skip
    expected_masked, expected_distilled = _fitness_both(0, ws.ckpt, ws.data, masked, distilled)
    for got_masked, got_distilled in run_distributed(_fitness_both, 2, tensor_parallel=2,
                                                     args=(ws.ckpt_tp2, ws.data, masked, distilled)):  # fmt: skip
        np.testing.assert_allclose(got_masked, expected_masked, rtol=1e-6)
        np.testing.assert_allclose(got_distilled, expected_distilled, rtol=1e-5)
    assert expected_distilled[0] != pytest.approx(_fitness(0, ws.ckpt, ws.data, distilled[:1], 0)[0], rel=1e-4)


def _importance(rank: int, cases: list[tuple[dict, dict]], batches: list[torch.Tensor]) -> list[dict]:
    from megatron_subnet.model.weights import model_from_state

    out = []
    for kwargs, state in cases:
        config = ModelConfig(**kwargs)
        model = model_from_state(config, shard_state_dict(config, state, TPShard.current()))
        out.append(compute_importance(model, batches, progress=False)._tensors())
    return out


def test_importance_scores_at_tp4_equal_one_process():
    """Heads and neurons gathered over 4 TP ranks into the global vectors, hidden channels, block and drop-loss
    importance: equal to one process's (GPT-NeoX: parallel residual, biases; llama: GQA)."""
    kwargs = [NEOX, {**PARENT, "num_attention_heads": 8, "num_query_groups": 4}]
    cases = [(kw, random_weights(ModelConfig(**kw), seed=1)) for kw in kwargs]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (2, 13), generator=g) for _ in range(2)]
    expected = _importance(0, cases, batches)
    for got in run_distributed(_importance, 4, tensor_parallel=4, args=(cases, batches)):
        for got_case, expected_case in zip(got, expected):
            assert got_case.keys() == expected_case.keys()
            for name in expected_case:
                torch.testing.assert_close(got_case[name], expected_case[name], rtol=1e-5, atol=1e-6, msg=name)
