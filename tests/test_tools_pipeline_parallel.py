"""The tools under pipeline parallelism (issue 10): checkpoints resharded between any TP x PP layouts bit for bit
(and to/from Hugging Face), and tools/evaluate.py, tools/compute_importance.py and tools/search_subnet.py under
torchrun at PP=2 (and TP=2 x PP=2) giving a single process's results; the masked evaluation and the importance
scores at PP=2, TP=2 x PP=2 and PP=3 in-process; one-line errors for layouts a model cannot take.

The parent has 3 layers, so PP=2 is an uneven split (2 + 1 layers)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_subnet.data.indexed import IndexedDatasetBuilder
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.extract import extract_state_dict
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import CheckpointReader, load_checkpoint, save_checkpoint
from megatron_subnet.search.evolution import read_results
from tests.distributed import run_distributed
from tests.test_tools_tensor_parallel import (
    NEOX,
    PARENT,
    VOCAB,
    _exit_code,
    _one_error_line,
    _search_records,
    random_weights,
    torchrun,
)
from tools.compute_importance import main as importance_main
from tools.convert_checkpoint import main as convert_main
from tools.evaluate import main as evaluate_main
from tools.search_subnet import main as search_main

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

SPLIT, SEQ, MBS = "80,20,0", "16", "2"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """A tiny 3-layer llama parent saved consolidated, at PP=2 and at TP=2 x PP=3; a dataset; a masked candidate
    keeping some hidden channels (so the messages between stages are narrower than the parent's hidden size)."""
    root = tmp_path_factory.mktemp("pp_tools")
    config = ModelConfig(**PARENT)
    state = random_weights(config)
    save_checkpoint(root / "ckpt", config, state)
    save_checkpoint(root / "ckpt_pp2", config, state, pipeline_parallel_size=2)
    save_checkpoint(root / "ckpt_tp2_pp3", config, state, tensor_parallel_size=2, pipeline_parallel_size=3)
    subnet = SubnetConfig(layers=[0, 2], hidden=list(range(1, 32, 2)), heads=[[0, 3], [1]], query_groups=[[0, 1], [0]],
                          mlp=[list(range(0, 48, 3)), list(range(20, 44))])  # fmt: skip
    subnet.save(root / "subnet.json")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(root / "data", np.uint16) as builder:
        for n in rng.integers(10, 81, size=60):
            builder.add_document(rng.integers(0, VOCAB, size=n))
    return SimpleNamespace(root=root, config=config, state=state, ckpt=str(root / "ckpt"),
                           ckpt_pp2=str(root / "ckpt_pp2"), ckpt_tp2_pp3=str(root / "ckpt_tp2_pp3"),
                           subnet=str(root / "subnet.json"), data=str(root / "data"))  # fmt: skip


def _data(iters_flag: str, iters: int) -> list[str]:
    return ["--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS, iters_flag, str(iters)]


# ---------------------------------------------------------------------- checkpoints: import, reshard, export


def _weight_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def test_import_reshard_export_across_tp_x_pp_is_bit_exact(tmp_path, capsys):
    """HF -> import at TP=2 x PP=2 -> reshard to TP=1 x PP=4 -> reshard to TP=1 x PP=1 -> export: the HF tensors, bit
    for bit; export reads a pipeline-sharded input; extract writes student stages; reshard keeps a size it is not
    given and the sub-network a student was cut by."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                            tie_word_embeddings=False)  # fmt: skip
    AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).save_pretrained(tmp_path / "hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")

    def layout(tp: int, pp: int) -> list[str]:
        if tp == pp == 1:
            return ["model.safetensors"]
        return sorted(f"mp_rank_{t:02d}_{p:03d}.safetensors" if pp > 1 else f"mp_rank_{t:02d}.safetensors"
                      for t in range(tp) for p in range(pp))  # fmt: skip

    steps = [
        (["import", "--input", tmp_path / "hf", "--output", tmp_path / "tp2pp2", "--tensor-model-parallel-size", "2",
          "--pipeline-model-parallel-size", "2"], "tp2pp2", 2, 2, "2 tensor-parallel shards x 2 pipeline stages"),
        (["reshard", "--input", tmp_path / "tp2pp2", "--output", tmp_path / "tp1pp4", "--tensor-model-parallel-size",
          "1", "--pipeline-model-parallel-size", "4"], "tp1pp4", 1, 4, "-> 4 pipeline stages"),
        (["reshard", "--input", tmp_path / "tp1pp4", "--output", tmp_path / "tp1pp1", "--tensor-model-parallel-size",
          "1", "--pipeline-model-parallel-size", "1"], "tp1pp1", 1, 1, "4 pipeline stages -> consolidated"),
        (["reshard", "--input", tmp_path / "tp2pp2", "--output", tmp_path / "tp2pp3",  # TP kept: the input's 2
          "--pipeline-model-parallel-size", "3"], "tp2pp3", 2, 3, "-> 2 tensor-parallel shards x 3 pipeline stages"),
    ]  # fmt: skip
    for argv, name, tp, pp, note in steps:
        assert convert_main([str(a) for a in argv]) == 0, capsys.readouterr().err
        assert note in capsys.readouterr().out, name
        assert _weight_files(tmp_path / name) == layout(tp, pp), name
        with CheckpointReader(tmp_path / name) as reader:
            assert (reader.tp_size, reader.pp_size) == (tp, pp)
    config, state = load_checkpoint(tmp_path / "tp1pp1")
    # stage files hold only their layers: 4 layers over 4 stages, one each; embedding first, output layer last
    for p in range(4):
        names = load_file(tmp_path / "tp1pp4" / f"mp_rank_00_{p:03d}.safetensors").keys()
        assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {str(p)}
        assert ("embedding.weight" in names) == (p == 0) and ("output_layer.weight" in names) == (p == 3)
    for src in ("tp1pp1", "tp1pp4", "tp2pp3"):
        with CheckpointReader(tmp_path / src) as reader:
            got = reader.read_all()
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state), src
    for src in ("tp1pp1", "tp2pp2"):  # export from the consolidated and from the TP=2 x PP=2 checkpoint
        assert convert_main(["export", "--input", str(tmp_path / src), "--output", str(tmp_path / f"hf_{src}")]) == 0
        exported = load_file(tmp_path / f"hf_{src}" / "model.safetensors")
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k], original[k]) for k in original), src
    capsys.readouterr()

    # extract from the 4 stages, written as a 3-layer student in 2 stages (2 + 1) == extract_state_dict
    subnet = SubnetConfig(layers=[0, 2, 3], hidden=list(range(1, 32, 2)), heads=[[1, 4], [2, 3, 6, 7], [0, 1]],
                          query_groups=[[0, 2], [1, 3], [0]],
                          mlp=[list(range(0, 64, 2)), list(range(16, 48)), list(range(8))])  # fmt: skip
    subnet.save(tmp_path / "subnet.json")
    argv = ["extract", "--input", tmp_path / "tp1pp4", "--subnet", tmp_path / "subnet.json", "--output",
            tmp_path / "student", "--pipeline-model-parallel-size", "2"]  # fmt: skip
    assert convert_main([str(a) for a in argv]) == 0
    assert "2 pipeline stages" in capsys.readouterr().out
    assert _weight_files(tmp_path / "student") == ["mp_rank_00_000.safetensors", "mp_rank_00_001.safetensors"]
    student_config, expected = extract_state_dict(config, state, subnet)
    with CheckpointReader(tmp_path / "student") as reader:
        assert (reader.tp_size, reader.pp_size) == (1, 2) and reader.config == student_config
        got = reader.read_all()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    argv = ["reshard", "--input", tmp_path / "student", "--output", tmp_path / "student_pp1",
            "--pipeline-model-parallel-size", "1"]  # fmt: skip
    assert convert_main([str(a) for a in argv]) == 0
    assert _weight_files(tmp_path / "student_pp1") == ["model.safetensors"]
    assert json.loads((tmp_path / "student_pp1" / "subnet.json").read_text()) == subnet.to_dict()


def test_impossible_layouts_are_one_line_errors(ws, tmp_path, capsys):
    from megatron_subnet.model.hf import save_hf

    save_hf(tmp_path / "hf", ws.config, ws.state)
    odd = ModelConfig(**{**PARENT, "hidden_size": 48, "num_attention_heads": 6, "num_query_groups": 3})  # not TP=2
    save_checkpoint(tmp_path / "odd", odd, random_weights(odd))
    two_layers = SubnetConfig.from_counts(ws.config, num_layers=2)
    two_layers.save(tmp_path / "two_layers.json")
    out = tmp_path / "out"
    pp = lambda n: ["--pipeline-model-parallel-size", str(n)]  # noqa: E731
    tp = lambda n: ["--tensor-model-parallel-size", str(n)]  # noqa: E731
    convert_cases = [
        (["reshard", "--input", ws.ckpt_pp2, "--output", out, *pp(4)],
         ["--pipeline-model-parallel-size 4", "more stages than its 3 layers"]),
        (["reshard", "--input", ws.ckpt, "--output", out, *tp(1), *pp(5)], ["--pipeline-model-parallel-size 5"]),
        (["import", "--input", tmp_path / "hf", "--output", out, *tp(2), *pp(4)],
         ["--pipeline-model-parallel-size 4", "more stages than its 3 layers"]),
        (["extract", "--input", ws.ckpt_tp2_pp3, "--subnet", tmp_path / "two_layers.json", "--output", out, *pp(3)],
         ["--pipeline-model-parallel-size 3", "the student of --subnet", "more stages than its 2 layers"]),
        (["reshard", "--input", tmp_path / "odd", "--output", out, *tp(2), *pp(2)],
         ["--tensor-model-parallel-size 2", "num_query_groups 3 is not divisible by --tensor-model-parallel-size 2"]),
        (["reshard", "--input", ws.ckpt, "--output", out],
         ["--tensor-model-parallel-size", "--pipeline-model-parallel-size"]),
        (["reshard", "--input", ws.ckpt, "--output", out, *pp(0)], ["--pipeline-model-parallel-size", "'0'"]),
    ]  # fmt: skip
    for argv, texts in convert_cases:
        assert _exit_code(convert_main, argv) == 2, argv
        _one_error_line(capsys, *texts)
        assert not out.exists()

    data = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS]
    search = [*data, "--target-params", "0.5", "--output", out]
    cases = [
        (evaluate_main, ["--load", ws.ckpt_pp2, *data, *pp(4)], 1,
         ["--load", "--pipeline-model-parallel-size 4: more stages than the 3 layers"]),
        (evaluate_main, ["--load", tmp_path / "hf", *data, *pp(4)], 1,  # config known only once loaded: torchrun
         ["--pipeline-model-parallel-size 4", "torchrun --nproc-per-node 4"]),
        (importance_main, ["--load", ws.ckpt, *data, *pp(4), "--output", out / "i.safetensors"], 1,
         ["--pipeline-model-parallel-size 4: more stages than the 3 layers"]),
        (search_main, ["--load", ws.ckpt_pp2, *search, *pp(4)], 1, ["more stages than the 3 layers"]),
        (evaluate_main, ["--load", ws.ckpt_pp2, *data, *pp(2)], 1, ["needs that many processes", "torchrun"]),
        (importance_main, ["--load", ws.ckpt, *data, *tp(2), *pp(2), "--output", out / "i.safetensors"], 1,
         ["--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2", "torchrun --nproc-per-node 4"]),
        (search_main, ["--load", ws.ckpt_pp2, *search, *pp(2)], 1, ["needs that many processes"]),
        (evaluate_main, ["--load", ws.ckpt, *data, "--hf", *pp(2)], 2, ["--hf", "--pipeline-model-parallel-size 2"]),
        (search_main, ["--load", ws.ckpt_pp2, *search, *pp(2), "--fitness-train-steps", "1"], 2,
         ["--fitness-train-steps at --pipeline-model-parallel-size 2", "--min-layers 2 or more (got 1)"]),
    ]  # fmt: skip
    for main, argv, code, texts in cases:
        assert _exit_code(main, argv) == code, argv
        _one_error_line(capsys, *texts)
        assert not out.exists()


# ---------------------------------------------------------------------- in-process: masked evaluation, importance


def _stage_results(rank: int, kwargs: dict, state: dict, batches: list, subnets: list) -> tuple[list, dict]:
    from megatron_subnet.model.evaluation import evaluate_model
    from megatron_subnet.model.importance import compute_importance
    from megatron_subnet.model.shapes import expected_shapes
    from megatron_subnet.model.weights import model_from_state, shard_state_dict
    from megatron_subnet.parallel.layers import TPShard
    from megatron_subnet.parallel.pipeline import current_stage

    config, shard = ModelConfig(**kwargs), TPShard.current()
    stage = current_stage(config.num_layers)
    tensors = shard_state_dict(config, state, shard)
    model = model_from_state(config, {n: tensors[n] for n in expected_shapes(config, shard, stage)}, "cpu", shard,
                             stage)  # fmt: skip
    losses = [evaluate_model(model, batches, "cpu", s, progress=False).loss for s in [None, *subnets]]
    return losses, compute_importance(model, batches, progress=False)._tensors()


@pytest.mark.parametrize("kwargs,tp,pp", [(PARENT, 1, 3), ({**NEOX, "num_layers": 3}, 2, 2)],
                         ids=["llama-pp3", "neox-tp2-pp2"])  # fmt: skip
def test_masked_losses_and_importance_over_stages_equal_one_process(kwargs, tp, pp):
    """Random masked candidates (any kept layers, hidden channels, heads, neurons: a stage may run none of its
    layers) and every importance score (heads, neurons, hidden channels summed over the stages' norms, block,
    drop loss as one pipelined forward per layer) on every rank equal one process's."""
    from tests.test_subnet import random_subnet

    config = ModelConfig(**kwargs)
    state = random_weights(config, seed=1)
    rng = random.Random(0)
    subnets = [random_subnet(config, rng) for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (2, 13), generator=g) for _ in range(2)]
    expected_losses, expected_scores = _stage_results(0, kwargs, state, batches, subnets)
    out = run_distributed(_stage_results, tp * pp, tensor_parallel=tp, pipeline_parallel=pp,
                          args=(kwargs, state, batches, subnets))  # fmt: skip
    for losses, scores in out:
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
        assert scores.keys() == expected_scores.keys() and "drop_loss" in scores
        for name in expected_scores:
            torch.testing.assert_close(scores[name], expected_scores[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- the tools under torchrun


def test_evaluate_at_pp2_and_tp2_pp2_equals_one_process(ws, tmp_path):
    """PP=2 on the PP=2 checkpoint with a masked --subnet (narrower messages), and TP=2 x PP=2 (4 processes) on the
    checkpoint saved at TP=2 x PP=3: each gives the single process's loss; rank 0 alone appends."""
    common = ["--data-path", ws.data, *_data("--eval-iters", 3)]
    one = tmp_path / "one.jsonl"
    assert evaluate_main(["--load", ws.ckpt, *common, "--subnet", ws.subnet, "--output", str(one)]) == 0
    assert evaluate_main(["--load", ws.ckpt, *common, "--output", str(one)]) == 0
    masked, dense = [json.loads(line) for line in one.read_text().splitlines()]
    runs = [
        (2, ["--load", ws.ckpt_pp2, "--subnet", ws.subnet, "--pipeline-model-parallel-size", "2"], masked, 1, 2),
        (4, ["--load", ws.ckpt_tp2_pp3, "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"],
         dense, 2, 2),
    ]  # fmt: skip
    for k, (nproc, args, expected, tp, pp) in enumerate(runs):
        output = tmp_path / f"pp{k}.jsonl"
        result = torchrun(nproc, "evaluate.py", [*args, *common, "--output", output], tmp_path)
        lines = output.read_text().splitlines()
        assert len(lines) == 1, lines
        got = json.loads(lines[0])
        assert (got["tensor_model_parallel_size"], got["pipeline_model_parallel_size"]) == (tp, pp)
        assert got["tokens"] == expected["tokens"] == 3 * 2 * 16
        assert got["non_embedding_params"] == expected["non_embedding_params"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6), args
        printed = [line for line in result.stdout.splitlines() if line.startswith("loss ")]
        assert len(printed) == 1, result.stdout
    assert masked["loss"] != pytest.approx(dense["loss"], rel=1e-3)


def test_importance_at_pp2_equals_one_process(ws, tmp_path):
    """A consolidated --load read at PP=2 (each rank its stage): the same scores, drop loss included."""
    common = ["--data-path", ws.data, *_data("--calib-iters", 2), "--drop-loss-iters", "1"]
    assert importance_main(["--load", ws.ckpt, *common, "--output", str(tmp_path / "one.safetensors")]) == 0
    torchrun(2, "compute_importance.py", ["--load", ws.ckpt, *common, "--pipeline-model-parallel-size", "2",
                                          "--output", tmp_path / "pp2.safetensors"], tmp_path)  # fmt: skip
    one, pp2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "pp2.safetensors")
    assert one.keys() == pp2.keys() and {"drop_loss", "block", "hidden", "heads.0", "heads.2", "mlp.2"} <= one.keys()
    for name in one:
        torch.testing.assert_close(pp2[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_search_at_pp2_and_pp2_dp2_equals_one_process(ws, tmp_path):
    """Same seed and budget at PP=2 on the PP=2 checkpoint, and at PP=2 x DP=2 (candidates split over the 2
    replicas) on the TP=2 x PP=3 one: the same candidates, losses within 1e-5 and the same best sub-network as
    one process."""
    common = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS,
              "--fitness-batches", "2", "--space", "per_layer", "--target-params", "0.5", "--tolerance", "0.1",
              "--population", "6", "--elite", "1", "--generations", "2"]  # fmt: skip
    assert search_main(["--load", ws.ckpt, *common, "--output", str(tmp_path / "one")]) == 0
    torchrun(2, "search_subnet.py", ["--load", ws.ckpt_pp2, *common, "--pipeline-model-parallel-size", "2",
                                     "--output", tmp_path / "pp2"], tmp_path)  # fmt: skip
    torchrun(4, "search_subnet.py", ["--load", ws.ckpt_tp2_pp3, *common, "--pipeline-model-parallel-size", "2",
                                     "--output", tmp_path / "pp2dp2"], tmp_path)  # fmt: skip
    reference = read_results(tmp_path / "one" / "results.jsonl")
    assert len(reference) == 6 + 5
    for run_dir in ("pp2", "pp2dp2"):
        got = read_results(tmp_path / run_dir / "results.jsonl")
        assert _search_records(tmp_path / run_dir) == _search_records(tmp_path / "one"), run_dir
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in reference], rtol=1e-5, atol=0)
        best = (tmp_path / run_dir / "best_subnet.json").read_text()
        assert best == (tmp_path / "one" / "best_subnet.json").read_text(), run_dir


def test_search_with_distilled_fitness_at_pp2_equals_one_process(ws, tmp_path):
    """tools/search_subnet.py --fitness-train-steps 2 at PP=2 (each candidate's student trained through the
    stages): the same candidates, losses within 1e-5 and the same best sub-network as one process."""
    common = ["--data-path", ws.data, "--split", SPLIT, "--seq-length", SEQ, "--micro-batch-size", MBS,
              "--fitness-batches", "2", "--fitness-train-steps", "2", "--fitness-lr", "1e-3", "--min-layers", "2",
              "--space", "per_layer", "--target-params", "0.5", "--tolerance", "0.1", "--population", "4",
              "--elite", "1", "--generations", "1"]  # fmt: skip
    assert search_main(["--load", ws.ckpt, *common, "--output", str(tmp_path / "one")]) == 0
    torchrun(2, "search_subnet.py", ["--load", ws.ckpt_pp2, *common, "--pipeline-model-parallel-size", "2",
                                     "--output", tmp_path / "pp2"], tmp_path)  # fmt: skip
    reference, got = (read_results(tmp_path / name / "results.jsonl") for name in ("one", "pp2"))
    assert _search_records(tmp_path / "pp2") == _search_records(tmp_path / "one")
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in reference], rtol=1e-5, atol=0)
    assert (tmp_path / "pp2" / "best_subnet.json").read_text() == (tmp_path / "one" / "best_subnet.json").read_text()


def _distilled_fitness(rank: int, ckpt: str, data: str, subnets: list[SubnetConfig]) -> list[float]:
    from megatron_subnet.data.batches import load_batches
    from megatron_subnet.model.weights import CheckpointReader
    from megatron_subnet.search.fitness import FitnessConfig, SubnetFitness, load_parent

    parent = load_parent(ckpt)
    valid = load_batches(data, SPLIT, "valid", int(SEQ), int(MBS), 2, 1234)
    train = load_batches(data, SPLIT, "train", int(SEQ), int(MBS), 2, 1234)
    with CheckpointReader(ckpt) as reader:
        fitness = SubnetFitness(parent, valid, train, FitnessConfig(train_steps=3, lr=1e-3), read=reader.read)
        return [fitness.loss(s) for s in subnets]


def test_distilled_fitness_through_the_stages_equals_one_process(ws):
    """--fitness-train-steps at PP=2: each stage cuts its part of the student from the parent's file and three
    distillation steps run through the stages beside the parent's (tied embedding: one summed gradient); the
    validation loss equals one process's for three candidates, one of them split unevenly (3 layers: 2 + 1)."""
    config = ws.config
    subnets = [
        SubnetConfig.from_counts(config, num_layers=3, hidden_size=24, num_attention_heads=2, num_query_groups=2,
                                 ffn_hidden_size=32),
        SubnetConfig(layers=[0, 2], hidden=list(range(0, 32, 2)), heads=[[1, 2], [0, 1, 2, 3]],
                     query_groups=[[0, 1], [0, 1]], mlp=[list(range(5, 37)), list(range(0, 48, 3))]),
        SubnetConfig.from_counts(config, num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                 ffn_hidden_size=48),
    ]  # fmt: skip
    expected = _distilled_fitness(0, ws.ckpt, ws.data, subnets)
    for got in run_distributed(_distilled_fitness, 2, pipeline_parallel=2, args=(ws.ckpt_pp2, ws.data, subnets)):
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    masked = [evaluate_model_loss(ws, s) for s in subnets]
    assert all(abs(d - m) > 1e-4 * abs(m) for d, m in zip(expected, masked)), (expected, masked)  # it trained


def evaluate_model_loss(ws, subnet: SubnetConfig) -> float:
    """The masked (untrained) candidate's validation loss on one process."""
    from megatron_subnet.data.batches import load_batches
    from megatron_subnet.search.fitness import SubnetFitness, load_parent

    valid = load_batches(ws.data, SPLIT, "valid", int(SEQ), int(MBS), 2, 1234)
    return SubnetFitness(load_parent(ws.ckpt), valid).loss(subnet)
