"""Sub-network search: valid in-budget operators, determinism, resume, DP=2 == DP=1, synthetic optimum, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_subnet.data.batches import load_batches
from megatron_subnet.data.indexed import IndexedDatasetBuilder
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import save_checkpoint
from megatron_subnet.search.evolution import EvolutionConfig, Search, read_results
from megatron_subnet.search.fitness import FitnessConfig, SubnetFitness, load_parent
from megatron_subnet.search.space import (
    SPACES,
    SearchSpace,
    SearchSpaceError,
    SpaceConfig,
    check_budget,
    make_budget,
)
from tests.tiny_models import tiny
from tools.search_subnet import main as search_main

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64

PARENTS = {
    # grouped-query attention: 8 heads in 2 groups; hidden a multiple of 24 keeps 1..8 heads exportable
    "llama": tiny(
        "llama", vocab_size=VOCAB, hidden_size=48, num_layers=4, num_attention_heads=8, num_query_groups=2,
        head_dim=6, ffn_hidden_size=64, tie_word_embeddings=True, init_std=0.3,
    ),
    "gpt_neox": tiny(
        "gpt_neox", vocab_size=VOCAB, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=4,
        head_dim=8, ffn_hidden_size=48, init_std=0.3,
    ),
}


def random_importance(config: ModelConfig, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    L = config.num_layers
    return SimpleNamespace(
        layers=torch.rand(L, generator=g),
        hidden=torch.rand(config.hidden_size, generator=g),
        heads=[torch.rand(config.layer_heads(i), generator=g) for i in range(L)],
        query_groups=[torch.rand(config.layer_query_groups(i), generator=g) for i in range(L)],
        mlp=[torch.rand(config.layer_ffn(i), generator=g) for i in range(L)],
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> SimpleNamespace:
    """Tiny parents saved as checkpoints, and a tiny dataset of random tokens."""
    tmp = tmp_path_factory.mktemp("search")
    ckpts = {}
    for name, kw in PARENTS.items():
        torch.manual_seed(0)
        model = GPTModel(ModelConfig(**kw))
        ckpts[name] = str(tmp / name)
        save_checkpoint(ckpts[name], model.config, model.state_dict())
    rng = np.random.default_rng(0)
    prefix = tmp / "data"
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for n in rng.integers(10, 81, size=80):
            builder.add_document(rng.integers(0, VOCAB, size=n))
    return SimpleNamespace(tmp=tmp, ckpts=ckpts, data=str(prefix))


def cli_args(workdir, output: Path, *extra: str, parent: str = "llama") -> list[str]:
    return [
        "--load",
        workdir.ckpts[parent],
        "--data-path",
        workdir.data,
        "--split",
        "80,20,0",
        "--seq-length",
        "16",
        "--micro-batch-size",
        "2",
        "--fitness-batches",
        "2",
        "--target-params",
        "0.5",
        "--tolerance",
        "0.1",
        "--population",
        "6",
        "--elite",
        "1",
        "--output",
        str(output),
        *extra,
    ]


def losses_and_configs(output: Path) -> list[tuple]:
    return [
        (r["generation"], r["key"], r["params"], r["loss"], json.dumps(r["config"]))
        for r in read_results(output / "results.jsonl")
    ]


# ---------------------------------------------------------------------- operators


@pytest.mark.parametrize("parent", sorted(PARENTS))
@pytest.mark.parametrize("kind", SPACES)
@pytest.mark.parametrize("with_importance", [False, True])
def test_operators_keep_candidates_valid_and_in_budget(parent, kind, with_importance):
    config = ModelConfig(**PARENTS[parent])
    space = SearchSpace(config, SpaceConfig(kind=kind), random_importance(config) if with_importance else None)
    budget = make_budget(space.parent_params(), bins=3, min_params=0.25, max_params=0.75)
    rng = np.random.default_rng(0)

    def check(g: dict, b: int | None = None) -> None:
        subnet = space.to_subnet(g)
        subnet.validate(config)
        assert subnet.num_parameters(config, include_embeddings=False) == space.params(g)
        if b is not None:
            low, high = budget.window(b)
            assert low <= space.params(g) <= high and budget.bin_of(space.params(g)) == b
        if config.arch == "llama":  # exportable: hidden a multiple of every kept layer's heads
            assert all(len(subnet.hidden) % len(h) == 0 for h in subnet.heads)
        assert all(len(m) % 8 == 0 for m in subnet.mlp) and len(subnet.hidden) % 8 == 0
        json.dumps(g)  # JSON-serialisable genome

    pool = []
    for i in range(12):
        b = i % budget.bins
        g = space.sample(rng, *budget.window(b))
        assert g is not None
        check(g, b)
        pool.append(g)
    for i in range(30):
        a, c = pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]
        for child in (space.mutate(a, rng, 0.5), space.crossover(a, c, rng)):
            if child is None:
                continue
            check(child)
            b = i % budget.bins
            repaired = space.repair(child, rng, *budget.window(b))
            if repaired is not None:
                check(repaired, b)
                pool.append(repaired)
    assert len(pool) > 20


def test_index_space_follows_importance_when_sampling():
    config = ModelConfig(**PARENTS["llama"])
    importance = random_importance(config)
    space = SearchSpace(config, SpaceConfig(kind="index"), importance)
    rng = np.random.default_rng(0)
    top, rest = [], []
    order = sorted(range(config.hidden_size), key=lambda i: -float(importance.hidden[i]))
    for _ in range(40):
        kept = set(space.to_subnet(space.sample(rng)).hidden)
        top.append(np.mean([i in kept for i in order[:12]]))
        rest.append(np.mean([i in kept for i in order[-12:]]))
    assert np.mean(top) > np.mean(rest) + 0.1


def _check_splittable(space: SearchSpace, g: dict, d: int, seen_groups: set) -> None:
    from megatron_subnet.model.shapes import check_divisible

    subnet = space.to_subnet(g)
    assert all(len(x) % d == 0 for x in subnet.query_groups + subnet.heads + subnet.mlp), subnet
    check_divisible(subnet.student_config(space.parent), d)  # raises when the student cannot be split
    seen_groups.update(len(x) for x in subnet.query_groups)


@pytest.mark.parametrize("kind", SPACES)
def test_divisible_by_keeps_every_candidate_splittable(kind):
    """--divisible-by N: sampled, mutated, crossed and repaired candidates keep query groups, heads and MLP width
    multiples of N, so every extracted student splits into N tensor-parallel ranks."""
    config = ModelConfig(**{**PARENTS["llama"], "num_attention_heads": 8, "num_query_groups": 4, "ffn_hidden_size": 96})
    for d in (2, 4):
        space = SearchSpace(config, SpaceConfig(kind=kind, divisible_by=d), random_importance(config))
        budget = make_budget(space.parent_params(), bins=3, min_params=0.2, max_params=0.8)
        rng = np.random.default_rng(d)
        seen_groups: set[int] = set()
        pool = []
        for i in range(9):
            g = space.sample(rng, *budget.window(i % budget.bins))
            assert g is not None
            _check_splittable(space, g, d, seen_groups)
            pool.append(g)
        for i in range(30):
            a, c = pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]
            for child in (space.mutate(a, rng, 0.5), space.crossover(a, c, rng)):
                if child is not None:
                    _check_splittable(space, child, d, seen_groups)
                    repaired = space.repair(child, rng, *budget.window(i % budget.bins))
                    if repaired is not None:
                        _check_splittable(space, repaired, d, seen_groups)
                        pool.append(repaired)
        assert len(pool) > 15
        assert seen_groups == ({2, 4} if d == 2 else {4})
    with pytest.raises(SearchSpaceError, match="--divisible-by 8: layer 0 of the parent has only 4 query groups"):
        SearchSpace(config, SpaceConfig(kind=kind, divisible_by=8))
    with pytest.raises(SearchSpaceError, match=r"--grid 8 x --divisible-by 3: larger than the parent's MLP size 16"):
        SearchSpace(ModelConfig(**{**PARENTS["gpt_neox"], "ffn_hidden_size": 16}), SpaceConfig(divisible_by=3))


def test_budget_and_space_errors():
    config = ModelConfig(**PARENTS["llama"])
    space = SearchSpace(config, SpaceConfig())
    total = space.parent_params()
    with pytest.raises(SearchSpaceError, match="outside what"):
        check_budget(space, make_budget(total, target=total * 3))
    with pytest.raises(SearchSpaceError, match="--max-layers 9"):
        SearchSpace(config, SpaceConfig(max_layers=9))
    with pytest.raises(SearchSpaceError, match="--grid 64"):
        SearchSpace(config, SpaceConfig(grid=64))
    with pytest.raises(SearchSpaceError, match="--min-params"):
        make_budget(total, bins=2, min_params=0.6, max_params=0.4)
    with pytest.raises(SearchSpaceError, match="no budget"):
        make_budget(total)
    budget = make_budget(total, bins=4, min_params=0.2, max_params=0.8)
    assert budget.bins == 4 and budget.bin_of(round(0.2 * total)) == 0 and budget.bin_of(round(0.8 * total)) == 3


# ---------------------------------------------------------------------- synthetic fitness


def synthetic_problem(kind: str):
    """A 12-layer parent (config only) and a fitness = distance to a hidden target sub-network in the budget."""
    config = ModelConfig(**tiny(
        "llama", vocab_size=100, hidden_size=256, num_layers=12, num_attention_heads=8, num_query_groups=4,
        head_dim=32, ffn_hidden_size=512,
    ))
    space = SearchSpace(config, SpaceConfig(kind=kind, hidden_divisible_by_heads=False))
    budget = make_budget(space.parent_params(), target=0.5, tolerance=0.1)

    def shape(s: SubnetConfig) -> tuple:
        sizes = [(len(g), len(h), len(m)) for g, h, m in zip(s.query_groups, s.heads, s.mlp)]
        return len(s.layers), len(s.hidden), sizes

    target = shape(space.to_subnet(space.sample(np.random.default_rng(123), *budget.window(0))))

    def distance(s: SubnetConfig) -> float:
        n, h, layers = shape(s)
        d = abs(n - target[0]) + abs(h - target[1]) / 8
        for j in range(max(n, target[0])):
            a = layers[j] if j < n else (0, 0, 0)
            b = target[2][j] if j < target[0] else (0, 0, 0)
            d += abs(a[0] - b[0]) + abs(a[1] - b[1]) + abs(a[2] - b[2]) / 8
        return float(d)

    return space, budget, lambda subnets: [(distance(s), 0.0) for s in subnets]


def test_evolution_finds_a_known_optimum_and_beats_random_search():
    space, budget, fitness = synthetic_problem("uniform")
    best = {}
    for mode in ("evolution", "random"):
        runs = [
            Search(
                space,
                budget,
                EvolutionConfig(population=16, generations=15, mode=mode, seed=s),
                fitness,
                progress=False,
            )
            for s in range(3)
        ]
        for run in runs:
            run.run()
        assert len({run.evaluations for run in runs}) == 1
        best[mode] = [run.overall_best()["loss"] for run in runs]
    assert best["evolution"] == [0.0, 0.0, 0.0]  # found the target every time
    assert np.mean(best["evolution"]) < np.mean(best["random"])
    assert runs[0].evaluations == 16 + 14 * (16 - 2)  # same budget in both modes


def test_evolution_beats_random_search_per_layer():
    space, budget, fitness = synthetic_problem("per_layer")
    means = {}
    for mode in ("evolution", "random"):
        losses = []
        for s in range(3):
            run = Search(
                space,
                budget,
                EvolutionConfig(population=16, generations=12, mode=mode, seed=s),
                fitness,
                progress=False,
            )
            run.run()
            losses.append(run.overall_best()["loss"])
        means[mode] = np.mean(losses)
    assert means["evolution"] < means["random"]


def test_bins_report_best_per_bin_and_keep_population_spread():
    space, _, fitness = synthetic_problem("uniform")
    budget = make_budget(space.parent_params(), bins=3, min_params=0.3, max_params=0.7)
    run = Search(space, budget, EvolutionConfig(population=12, generations=4, elite=2, seed=0), fitness, progress=False)
    run.run()
    assert all(b is not None for b in run.best)
    assert {m["bin"] for m in run.population} == {0, 1, 2}
    for entry in run.best_per_bin():
        assert entry["window"][0] <= entry["params"] <= entry["window"][1]


# ---------------------------------------------------------------------- real masked fitness, CLI


def test_search_is_deterministic_and_writes_outputs(workdir, tmp_path):
    for name in ("a", "b"):
        flags = ("--generations", "2", "--space", "per_layer", "--select-by", "selection")
        assert search_main(cli_args(workdir, tmp_path / name, *flags)) == 0
    assert losses_and_configs(tmp_path / "a") == losses_and_configs(tmp_path / "b")
    records = read_results(tmp_path / "a" / "results.jsonl")
    assert len(records) == 6 + 5 and all(np.isfinite(r["loss"]) for r in records)
    config = ModelConfig(**PARENTS["llama"])
    best = SubnetConfig.load(tmp_path / "a" / "best_subnet.json", config)
    assert min(r["loss"] for r in records) == json.loads((tmp_path / "a" / "best_per_bin.json").read_text())[0]["loss"]
    low, high = make_budget(config.num_parameters(False), 0.5, 0.1).window(0)
    assert low <= best.num_parameters(config, include_embeddings=False) <= high
    assert (tmp_path / "a" / "pareto.png").stat().st_size > 0


def test_index_space_with_importance_file_and_bins(workdir, tmp_path):
    from megatron_subnet.model.importance import Importance

    config = ModelConfig(**PARENTS["llama"])
    scores = random_importance(config)
    path = tmp_path / "importance.safetensors"
    Importance(
        hidden=scores.hidden, heads=scores.heads, query_groups=scores.query_groups, mlp=scores.mlp, block=scores.layers
    ).save(path)
    args = [a for a in cli_args(workdir, tmp_path / "out") if a not in ("--target-params", "0.5")]
    args += [
        "--space",
        "index",
        "--importance",
        str(path),
        "--bins",
        "2",
        "--min-params",
        "0.3",
        "--max-params",
        "0.7",
        "--generations",
        "2",
    ]
    assert search_main(args) == 0
    bins = json.loads((tmp_path / "out" / "best_per_bin.json").read_text())
    assert [b["bin"] for b in bins] == [0, 1]
    for b in bins:
        subnet = SubnetConfig.from_dict(b["subnet"], config)
        assert b["window"][0] <= subnet.num_parameters(config, include_embeddings=False) <= b["window"][1]


def test_resume_after_kill_gives_the_same_result(workdir, tmp_path, capsys):
    extra = ["--space", "index"]
    assert search_main(cli_args(workdir, tmp_path / "full", "--generations", "4", *extra, parent="gpt_neox")) == 0
    assert search_main(cli_args(workdir, tmp_path / "part", "--generations", "2", *extra, parent="gpt_neox")) == 0
    # a kill after results.jsonl got generation 2 but before state.json did: the stale lines are dropped
    with open(tmp_path / "part" / "results.jsonl", "a") as f:
        f.write(json.dumps({"generation": 2, "key": "stale", "params": 0, "loss": 0.0, "config": {}}) + "\n")
    assert search_main(cli_args(workdir, tmp_path / "part", "--generations", "4", *extra, parent="gpt_neox")) == 0
    assert losses_and_configs(tmp_path / "full") == losses_and_configs(tmp_path / "part")
    assert (tmp_path / "full" / "best_subnet.json").read_text() == (tmp_path / "part" / "best_subnet.json").read_text()
    # resuming with other settings is refused, naming what changed
    changed = cli_args(workdir, tmp_path / "part", "--generations", "4", "--seed", "1", *extra, parent="gpt_neox")
    assert search_main(changed) == 1
    assert "search.seed" in capsys.readouterr().err


def test_kill_in_the_middle_of_a_generation_resumes_exactly(tmp_path):
    space, budget, fitness = synthetic_problem("per_layer")
    config = EvolutionConfig(population=8, generations=5, seed=3)
    Search(space, budget, config, fitness, tmp_path / "full", progress=False).run()
    calls = []

    def dying(subnets):
        calls.append(len(subnets))
        if len(calls) == 8 + 6 + 3:  # one call per candidate: killed in generation 2
            raise KeyboardInterrupt
        return fitness(subnets)

    with pytest.raises(KeyboardInterrupt):
        Search(space, budget, config, dying, tmp_path / "part", progress=False).run()
    assert json.loads((tmp_path / "part" / "state.json").read_text())["generation"] == 2
    Search(space, budget, config, fitness, tmp_path / "part", progress=False).run()
    assert losses_and_configs(tmp_path / "full") == losses_and_configs(tmp_path / "part")
    assert (tmp_path / "full" / "state.json").read_text() == (tmp_path / "part" / "state.json").read_text()


def test_data_parallel_evaluation_equals_one_rank(workdir, tmp_path):
    args = cli_args(workdir, tmp_path / "dp2", "--generations", "2", "--space", "uniform")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "tools" / "search_subnet.py"),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert search_main(cli_args(workdir, tmp_path / "dp1", "--generations", "2", "--space", "uniform")) == 0
    finally:
        torch.set_num_threads(threads)
    dp1, dp2 = losses_and_configs(tmp_path / "dp1"), losses_and_configs(tmp_path / "dp2")
    assert [r[:3] + r[4:] for r in dp1] == [r[:3] + r[4:] for r in dp2]
    assert np.allclose([r[3] for r in dp1], [r[3] for r in dp2], rtol=1e-6, atol=0)


def test_short_distillation_fitness(workdir):
    parent = load_parent(workdir.ckpts["llama"])
    valid = load_batches(workdir.data, "80,20,0", "valid", 16, 2, 2, 1234)
    train = load_batches(workdir.data, "80,20,0", "train", 16, 2, 2, 1234)
    subnet = SubnetConfig.from_counts(parent.config, 3, 24, 4, 2, 32)
    masked = SubnetFitness(parent, valid).loss(subnet)
    frozen = SubnetFitness(parent, valid, train, FitnessConfig(train_steps=1, lr=0.0)).loss(subnet)
    assert frozen == pytest.approx(masked, rel=1e-5)  # extracted student == masked parent
    trained = SubnetFitness(parent, valid, train, FitnessConfig(train_steps=3, lr=1e-2)).loss(subnet)
    assert np.isfinite(trained) and trained != pytest.approx(masked, rel=1e-5)


# ---------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "extra, parent, message",
    [
        (["--target-params", "5.0e9"], "llama", "parameter budget"),
        (["--max-layers", "9"], "llama", "--max-layers 9"),
        (["--grid", "128"], "llama", "--grid 128"),
        (["--elite", "6"], "llama", "--elite 6"),
        (["--load", "/nonexistent/ckpt"], "llama", "--load"),
        (["--data-path", "/nonexistent/data"], "llama", "--data-path /nonexistent/data"),
        (["--importance", "/nonexistent/imp.safetensors"], "llama", "--importance"),
        (["--mutation-prob", "1.5"], "gpt_neox", "--mutation-prob: '1.5'"),  # argparse's own wording
        (["--fitness-batches", "0"], "llama", "--fitness-batches: '0'"),
        (["--divisible-by", "3"], "llama", "--divisible-by 3: layer 0 of the parent has only 2 query groups"),
        (["--divisible-by", "0"], "llama", "--divisible-by: '0'"),
    ],
)
def test_bad_inputs_give_one_line_errors(workdir, tmp_path, capsys, extra, parent, message):
    try:
        rc = search_main(cli_args(workdir, tmp_path / "out", *extra, parent=parent))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_wrong_checkpoint_layout_is_an_error(workdir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = ModelConfig(**{**PARENTS["llama"], "hidden_size": 24})  # weights of the 48-wide parent
    config.save(broken / "model_config.json")
    os.link(Path(workdir.ckpts["llama"]) / "model.safetensors", broken / "model.safetensors")
    args = cli_args(workdir, tmp_path / "out", "--load", str(broken), "--grid", "8")
    assert search_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --load") and "do not fit" in err


# ---------------------------------------------------------------------- issue 8: flags, outputs, resume, NaN


def _digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


def _run(args: list[str]) -> int:
    try:
        return search_main(args)
    except SystemExit as e:
        return e.code


def _one_error_line(capsys, *texts) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert all(t in lines[0] for t in texts), (texts, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "extra, code, texts",
    [
        (["--target-params", "inf"], 2, ["--target-params", "'inf'"]),
        (["--target-params", "nan"], 2, ["--target-params", "'nan'"]),
        (["--tolerance", "nan"], 2, ["--tolerance", "'nan'"]),
        (["--mutation-prob", "2"], 2, ["--mutation-prob", "'2'"]),
        (["--crossover-prob", "-0.1"], 2, ["--crossover-prob", "'-0.1'"]),
        (["--fitness-lr", "nan"], 2, ["--fitness-lr", "'nan'"]),
        (["--fitness-lr=-1e-4"], 2, ["--fitness-lr", "'-1e-4'"]),
        (["--fitness-kd-alpha", "1.5"], 2, ["--fitness-kd-alpha", "'1.5'"]),
        (["--fitness-train-steps", "-1"], 2, ["--fitness-train-steps", "'-1'"]),
        (["--population", "0"], 2, ["--population", "'0'"]),
        (["--grid", "2.5"], 2, ["--grid", "'2.5'"]),
        (["--seed", "-1"], 2, ["--seed", "'-1'"]),
        (["--device", "cuda:99"], 1, ["--device cuda:99"]),
        (["--seq-length", "4096"], 1, ["--seq-length 4096", "max_position_embeddings 2048"]),
    ],
)
def test_bad_flags_are_one_line_and_leave_no_output(workdir, tmp_path, capsys, extra, code, texts):
    assert _run(cli_args(workdir, tmp_path / "out", *extra)) == code
    _one_error_line(capsys, *texts)
    assert not (tmp_path / "out").exists()


def test_output_location_is_checked_before_the_work(workdir, tmp_path, capsys):
    """A file, search results without their state, or a directory holding / inside an input: refused before
    the data or the parent are read, with nothing written anywhere."""
    (tmp_path / "a_file").write_text("mine")
    orphans = tmp_path / "orphans"
    orphans.mkdir()
    (orphans / "best_subnet.json").write_text("{}")
    imp_dir = tmp_path / "imp"
    imp_dir.mkdir()
    (imp_dir / "importance.safetensors").write_bytes(b"not read")
    cases = [
        ([], tmp_path / "a_file", ["--output", "not a directory"]),
        ([], orphans, ["--output", "holds search results (best_subnet.json)", "no state.json", "--overwrite"]),
        ([], Path(workdir.ckpts["llama"]) / "search", ["--output", "lies inside the input --load"]),
        ([], Path(workdir.tmp), ["--output", "contains the input --load"]),
        (["--overwrite"], Path(workdir.tmp), ["--output", "contains the input"]),
        (["--importance", str(imp_dir / "importance.safetensors")], imp_dir,
         ["--output", "contains the input --importance"]),
    ]
    before, shared = _digest(tmp_path), _digest(workdir.tmp)
    for extra, output, texts in cases:
        assert _run(cli_args(workdir, output, *extra)) == 1, (output, capsys.readouterr().err)
        _one_error_line(capsys, *texts)
        assert _digest(tmp_path) == before and _digest(workdir.tmp) == shared


def test_overwrite_starts_a_new_search_over_orphaned_results(workdir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"generation": 0, "key": "old"}\n')
    (out / "notes.txt").write_text("mine")
    assert search_main(cli_args(workdir, out, "--generations", "1", "--overwrite")) == 0
    assert "old" not in (out / "results.jsonl").read_text() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "state.json").read_text())["generation"] == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_resume_compares_the_importance_file_by_content(workdir, tmp_path, capsys):
    from megatron_subnet.model.importance import Importance

    config = ModelConfig(**PARENTS["llama"])

    def write_scores(path: Path, seed: int) -> None:
        s = random_importance(config, seed)
        Importance(hidden=s.hidden, heads=s.heads, query_groups=s.query_groups, mlp=s.mlp, block=s.layers).save(path)

    first, moved = tmp_path / "a" / "imp.safetensors", tmp_path / "b" / "imp.safetensors"
    first.parent.mkdir()
    moved.parent.mkdir()
    write_scores(first, 0)
    out = tmp_path / "out"
    args = lambda imp, gens: cli_args(workdir, out, "--importance", str(imp), "--generations", gens)  # noqa: E731
    assert search_main(args(first, "1")) == 0
    os.replace(first, moved)  # the same scores elsewhere: resumes
    assert search_main(args(moved, "2")) == 0
    assert json.loads((out / "state.json").read_text())["generation"] == 2
    capsys.readouterr()
    write_scores(moved, 1)  # other scores at the same path: refused, naming what changed
    state = (out / "state.json").read_text()
    assert search_main(args(moved, "3")) == 1
    _one_error_line(capsys, "written by a search with other settings", "importance_sha256")
    assert (out / "state.json").read_text() == state


def test_a_search_with_no_finite_fitness_fails_and_writes_no_best(workdir, tmp_path, capsys):
    broken = tmp_path / "nan_parent"
    model = GPTModel(ModelConfig(**PARENTS["llama"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["final_layernorm.weight"][0] = float("nan")
    save_checkpoint(broken, model.config, state)
    out = tmp_path / "out"
    assert search_main(cli_args(workdir, out, "--load", str(broken), "--generations", "2")) == 1
    _one_error_line(capsys, "non-finite validation loss", "no best sub-network was written")
    assert not (out / "best_subnet.json").exists() and not (out / "best_per_bin.json").exists()
    assert not (out / "pareto.png").exists()
    # the library says the same
    space, budget, _ = synthetic_problem("uniform")
    nan_fitness = lambda subnets: [(float("nan"), 0.0) for _ in subnets]  # noqa: E731
    with pytest.raises(SearchSpaceError, match="non-finite"):
        Search(space, budget, EvolutionConfig(population=4, generations=2, elite=1), nan_fitness, progress=False).run()


def test_kill_in_generation_zero_resumes_exactly(tmp_path):
    """A fresh run writes state.json for generation 0 before evaluating, so a run killed in generation 0
    leaves a resumable directory (not orphaned results that need --overwrite)."""
    space, budget, fitness = synthetic_problem("uniform")
    config = EvolutionConfig(population=6, generations=3, seed=5)
    Search(space, budget, config, fitness, tmp_path / "full", progress=False).run()
    calls = []

    def dying(subnets):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fitness(subnets)

    with pytest.raises(KeyboardInterrupt):
        Search(space, budget, config, dying, tmp_path / "part", progress=False).run()
    assert json.loads((tmp_path / "part" / "state.json").read_text())["generation"] == 0
    Search(space, budget, config, fitness, tmp_path / "part", progress=False).run()
    assert losses_and_configs(tmp_path / "full") == losses_and_configs(tmp_path / "part")


@pytest.mark.slow
def test_search_errors_in_a_subprocess_are_one_line(workdir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for extra, code in ((["--tolerance", "nan"], 2), (["--device", "cuda:99"], 1)):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "search_subnet.py"),
                               *cli_args(workdir, tmp_path / "out", *extra)], capture_output=True, text=True, env=env)
        assert proc.returncode == code, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- issue 12: FLOPs, counts, held-out, one-shot


def _student_of(row: dict, config: ModelConfig) -> SubnetConfig:
    """The sub-network of a results row of a count space searched without importance (first-k indices)."""
    c = row["config"]
    subnet = SubnetConfig.from_counts(config, c["num_layers"], c["hidden_size"], c["num_attention_heads"],
                                      c["num_query_groups"], c["ffn_hidden_size"])  # fmt: skip
    assert subnet.layers == c["layers"]
    return subnet


def _importance_file(path: Path, config: ModelConfig, seed: int = 0, drop_loss: bool = True) -> SimpleNamespace:
    from megatron_subnet.model.importance import Importance

    s = random_importance(config, seed)
    drop = torch.rand(config.num_layers, generator=torch.Generator().manual_seed(seed + 100)) if drop_loss else None
    Importance(hidden=s.hidden, heads=s.heads, query_groups=s.query_groups, mlp=s.mlp, block=s.layers,
               drop_loss=drop).save(path)  # fmt: skip
    return SimpleNamespace(scores=s, drop_loss=drop)


def test_rows_and_summary_carry_flops_and_both_parameter_counts(workdir, tmp_path, capsys):
    from megatron_subnet.model.flops import forward_flops_per_token

    out = tmp_path / "out"
    assert search_main(cli_args(workdir, out, "--generations", "2", "--space", "per_layer")) == 0
    printed = capsys.readouterr().out
    config = ModelConfig(**PARENTS["llama"])
    tokens = 2 * 2 * 16  # --fitness-batches x --micro-batch-size x --seq-length
    records = read_results(out / "results.jsonl")
    expected_total = 0
    for r in records:
        subnet = _student_of(r, config)
        assert r["total_params"] == subnet.num_parameters(config, include_embeddings=True)
        assert r["non_embedding_params"] == subnet.num_parameters(config, include_embeddings=False) == r["params"]
        expected = 0 if r["cached"] else int(forward_flops_per_token(subnet.student_config(config), 16)) * tokens
        assert r["flops"] == expected
        expected_total += expected
    assert expected_total > 0
    summary = json.loads((out / "summary.json").read_text())
    state = json.loads((out / "state.json").read_text())
    assert summary["search_flops"] == state["search_flops"] == expected_total
    assert summary["parent"] == {"total_params": config.num_parameters(True),
                                 "non_embedding_params": config.num_parameters(False)}  # fmt: skip
    best = SubnetConfig.load(out / "best_subnet.json", config)
    assert summary["best"]["total_params"] == best.num_parameters(config, include_embeddings=True)
    assert summary["best"]["non_embedding_params"] == best.num_parameters(config, include_embeddings=False)
    for entry in json.loads((out / "best_per_bin.json").read_text()):
        subnet = SubnetConfig.from_dict(entry["subnet"], config)
        assert entry["total_params"] == subnet.num_parameters(config, include_embeddings=True)
        assert entry["non_embedding_params"] == subnet.num_parameters(config, include_embeddings=False)
    lines = printed.strip().splitlines()
    assert lines[0].startswith("bin 0") and lines[-1].startswith("best loss")
    for line in (lines[0], lines[-1]):
        assert "non-embedding /" in line and "total params" in line, line
    assert f"{summary['best']['total_params']:,} total params" in lines[-1]
    assert f"{expected_total:.3e} search FLOPs" in lines[-1]
    # a resumed (extended) search keeps counting
    assert search_main(cli_args(workdir, out, "--generations", "3", "--space", "per_layer")) == 0
    more = [r for r in read_results(out / "results.jsonl") if r["generation"] == 2]
    state = json.loads((out / "state.json").read_text())
    assert state["search_flops"] == expected_total + sum(r["flops"] for r in more) > expected_total


@pytest.mark.parametrize("train_steps", [0, 2])
def test_search_flops_equal_the_flop_counter(workdir, train_steps):
    """What the search says it spent is what FlopCounterMode counts it running (attention as two dense bmms)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    parent = load_parent(workdir.ckpts["llama"])
    valid = load_batches(workdir.data, "80,20,0", "valid", 16, 2, 2, 1234)
    train = load_batches(workdir.data, "80,20,0", "train", 16, 2, 2, 1234) if train_steps else None
    fitness = SubnetFitness(parent, valid, train, FitnessConfig(train_steps=train_steps, lr=1e-3))
    space = SearchSpace(parent.config, SpaceConfig(kind="per_layer"))
    budget = make_budget(space.parent_params(), target=0.5, tolerance=0.2)
    search = Search(space, budget, EvolutionConfig(population=3, generations=2, elite=1), fitness, progress=False,
                    rescore_top=2)  # fmt: skip
    heldout = load_batches(workdir.data, "80,20,0", "valid", 16, 2, 1, 99)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        search.run()
        spent = counter.get_total_flops()
        report = search.rescore(fitness.on_batches(heldout), {"split": "valid"})
    assert search.evaluations == 5 and spent == search.search_flops > 0
    assert counter.get_total_flops() - spent == report["rescore_flops"] > 0
    assert len(report["candidates"]) == 2


def test_heldout_samples_are_disjoint_from_the_selection(workdir):
    from megatron_subnet.search.fitness import load_heldout_batches

    selection = load_batches(workdir.data, "80,20,0", "valid", 16, 2, 3, 1234)
    heldout, info = load_heldout_batches(workdir.data, "80,20,0", 16, 2, 4, 1234, 6)
    assert info["split"] == "valid" and info["samples"] == 8 and info["tokens"] == 8 * 16
    assert "samples 6..13" in info["which"]
    sel = {tuple(row.tolist()) for b in selection for row in b}
    held = [tuple(row.tolist()) for b in heldout for row in b]
    assert len(sel) == 6 and len(set(held)) == 8 and not sel & set(held)
    # no token window shared: no 8-gram of a held-out sample occurs in a selection sample
    grams = {row[i : i + 8] for row in sel for i in range(len(row) - 7)}
    assert not any(row[i : i + 8] in grams for row in held for i in range(len(row) - 7))
    # with a test split: its documents, which the valid selection never holds
    test, info = load_heldout_batches(workdir.data, "70,15,15", 16, 2, 2, 1234, 6)
    assert info["split"] == "test" and len(test) == 2
    assert test[0].tolist() == load_batches(workdir.data, "70,15,15", "test", 16, 2, 2, 1234)[0].tolist()
    with pytest.raises(ValueError, match="cannot hold the 6 selection samples and 400 held-out ones"):
        load_heldout_batches(workdir.data, "80,20,0", 16, 2, 200, 1234, 6)


def test_rescoring_reports_both_losses_on_the_heldout_samples(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    args = cli_args(workdir, out, "--generations", "2", "--space", "per_layer", "--rescore-top", "3",
                    "--rescore-batches", "3")  # fmt: skip
    assert search_main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "rescored.json").read_text())
    assert report["split"] == "valid" and report["samples"] == 6 and report["tokens"] == 6 * 16
    assert report["selection"] == {"split": "valid", "data_seed": 1234, "samples": 4, "tokens": 64}
    records = {r["key"]: r for r in read_results(out / "results.jsonl") if not r["cached"]}
    rows = report["candidates"]
    assert len(rows) == 3 and [r["rank"] for r in rows] == [0, 1, 2]
    assert [r["selection_loss"] for r in rows] == sorted(r["loss"] for r in records.values())[:3]
    config = ModelConfig(**PARENTS["llama"])
    parent = load_parent(workdir.ckpts["llama"])
    from megatron_subnet.search.fitness import load_heldout_batches

    heldout, _ = load_heldout_batches(workdir.data, "80,20,0", 16, 2, 3, 1234, 4)
    from megatron_subnet.model.flops import forward_flops_per_token

    for row in rows:
        subnet = _student_of(records[row["key"]], config)
        assert row["heldout_loss"] == pytest.approx(SubnetFitness(parent, heldout).loss(subnet), rel=1e-6)
        assert row["heldout_loss"] != pytest.approx(row["selection_loss"], rel=1e-6)
        assert row["flops"] == int(forward_flops_per_token(subnet.student_config(config), 16)) * 6 * 16
        assert row["total_params"] == subnet.num_parameters(config, include_embeddings=True)
    assert report["rescore_flops"] == sum(r["flops"] for r in rows)
    assert "held-out re-scoring on the valid split (6 samples, 96 tokens" in printed
    assert printed.count("held-out loss") == 3
    # the default --select-by heldout: the winner is the re-scored candidate with the lowest held-out loss
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["heldout_loss"] == min(r["heldout_loss"] for r in rows)
    # a rerun resumes: nothing is evaluated or re-scored again, the files stay the same
    before = {name: (out / name).read_text() for name in ("results.jsonl", "rescored.json", "state.json")}
    assert search_main(args) == 0
    assert {name: (out / name).read_text() for name in before} == before
    # a changed held-out setting is another search's
    assert search_main(args[:-1] + ["2"]) == 1
    assert "rescore" in capsys.readouterr().err
    # the test split, when there is one
    out2 = tmp_path / "with_test"
    split = ["--split", "70,15,15", "--rescore-top", "1"]
    assert search_main(cli_args(workdir, out2, "--generations", "1", *split)) == 0
    report = json.loads((out2 / "rescored.json").read_text())
    assert report["split"] == "test" and report["samples"] == 4 and len(report["candidates"]) == 1
    # --rescore-top 0: no re-scoring
    out3 = tmp_path / "none"
    assert search_main(cli_args(workdir, out3, "--generations", "1", "--rescore-top", "0")) == 0
    assert not (out3 / "rescored.json").exists()
    assert not [p.name for d in (out, out2, out3) for p in d.iterdir() if p.name.startswith(".")]


def test_select_by_heldout_picks_the_best_rescored_candidate_on_samples_the_selection_never_saw(
    workdir, tmp_path, capsys
):
    """Same search, winner picked two ways: --select-by heldout writes the re-scored candidate with the lowest
    held-out loss (here not the search's own best), --select-by selection the search's own best; the held-out
    batches share no sample with the selection's."""
    extra = ("--generations", "3", "--space", "per_layer", "--rescore-top", "4", "--rescore-batches", "3",
             "--seed", "2", "--no-seed-oneshot")  # fmt: skip
    config = ModelConfig(**PARENTS["llama"])
    picked = {}
    for how in ("heldout", "selection"):
        out = tmp_path / how
        assert search_main(cli_args(workdir, out, *extra, "--select-by", how)) == 0
        rows = json.loads((out / "rescored.json").read_text())["candidates"]
        best = min(rows, key=lambda r: (r["heldout_loss"] if how == "heldout" else r["selection_loss"], r["key"]))
        records = {r["key"]: r for r in read_results(out / "results.jsonl")}
        assert SubnetConfig.load(out / "best_subnet.json", config) == _student_of(records[best["key"]], config)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["selected_by"] == how and summary["best"]["key"] == best["key"]
        picked[how] = best["key"]
    assert picked["heldout"] != picked["selection"]
    capsys.readouterr()
    selection = torch.cat(load_batches(workdir.data, "80,20,0", "valid", 16, 2, 2, 1234))
    from megatron_subnet.search.fitness import load_heldout_batches

    heldout = torch.cat(load_heldout_batches(workdir.data, "80,20,0", 16, 2, 3, 1234, 4)[0])
    assert not {tuple(row) for row in selection.tolist()} & {tuple(row) for row in heldout.tolist()}
    assert len({tuple(row) for row in heldout.tolist()}) == len(heldout)


def test_evolution_opens_with_the_oneshot_shapes(workdir, tmp_path):
    """Generation 0 of --mode evolution holds the first-k, width-only and depth-only shapes that fit the
    budget (marked seeded_from), first-k's being exactly what --mode first_k picks; --no-seed-oneshot and
    --mode random draw all of it at random."""
    out = tmp_path / "seeded"
    assert search_main(cli_args(workdir, out, "--generations", "1", "--space", "per_layer")) == 0
    rows = read_results(out / "results.jsonl")
    seeded = {r["seeded_from"]: r for r in rows if "seeded_from" in r}
    assert "first_k" in seeded and set(seeded) <= {"first_k", "width_oneshot", "depth_oneshot"}
    assert all(r["bin"] == 0 for r in seeded.values())  # inside the budget
    assert [r.get("seeded_from") for r in rows[: len(seeded)]] == list(seeded)  # they open the generation
    assert search_main(cli_args(workdir, tmp_path / "first_k", "--mode", "first_k")) == 0
    (oneshot,) = read_results(tmp_path / "first_k" / "results.jsonl")
    assert seeded["first_k"]["config"] == oneshot["config"]
    for name, extra in (("unseeded", ("--no-seed-oneshot",)), ("random", ("--mode", "random"))):
        flags = ("--generations", "1", "--space", "per_layer", *extra)
        assert search_main(cli_args(workdir, tmp_path / name, *flags)) == 0
        assert not [r for r in read_results(tmp_path / name / "results.jsonl") if "seeded_from" in r]


def test_a_split_too_small_for_heldout_samples_is_one_line_before_the_search(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(cli_args(workdir, out, "--rescore-batches", "500")) == 1
    _one_error_line(capsys, "--split 80,20,0", "no test documents", "--rescore-top 0")
    assert not out.exists()
    orphans = tmp_path / "orphans"
    orphans.mkdir()
    (orphans / "rescored.json").write_text("{}")
    assert _run(cli_args(workdir, orphans)) == 1
    _one_error_line(capsys, "holds search results (rescored.json)", "--overwrite")


def test_killed_rescoring_resumes_exactly(tmp_path):
    space, budget, fitness = synthetic_problem("uniform")
    config = EvolutionConfig(population=6, generations=2, seed=1)
    heldout = lambda subnets: [(loss + 1.0, 0.0, 7) for loss, _ in fitness(subnets)]  # noqa: E731
    full = Search(space, budget, config, fitness, tmp_path / "full", progress=False, rescore_top=3)
    full.run()
    expected = full.rescore(heldout, {"split": "test"})
    assert [r["heldout_loss"] for r in expected["candidates"]] == [r["selection_loss"] + 1 for r in
                                                                     expected["candidates"]]  # fmt: skip
    calls = []

    def dying(subnets):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return heldout(subnets)

    part = Search(space, budget, config, fitness, tmp_path / "part", progress=False, rescore_top=3)
    part.run()
    with pytest.raises(KeyboardInterrupt):
        part.rescore(dying, {"split": "test"})
    assert len(json.loads((tmp_path / "part" / "state.json").read_text())["rescored"]) == 1
    again = Search(space, budget, config, fitness, tmp_path / "part", progress=False, rescore_top=3)
    again.run()
    counted = []
    assert again.rescore(lambda s: counted.append(len(s)) or heldout(s), {"split": "test"}) == expected
    assert counted == [1, 1]  # only the two not scored before the kill
    assert (tmp_path / "full" / "rescored.json").read_text() == (tmp_path / "part" / "rescored.json").read_text()
    assert expected["rescore_flops"] == 3 * 7


def _oneshot(workdir, tmp_path, mode: str, *extra: str) -> tuple[Path, ModelConfig, SubnetConfig, list[dict]]:
    out = tmp_path / mode
    args = cli_args(workdir, out, "--mode", mode, *extra)
    assert search_main(args) == 0
    config = ModelConfig(**PARENTS["llama"])
    subnet = SubnetConfig.load(out / "best_subnet.json", config)
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 1 and rows[0]["mode"] == mode and not rows[0]["cached"]
    low, high = make_budget(config.num_parameters(False), 0.5, 0.1).window(0)
    assert low <= subnet.num_parameters(config, include_embeddings=False) == rows[0]["params"] <= high
    assert rows[0]["total_params"] == subnet.num_parameters(config, include_embeddings=True)
    report = json.loads((out / "rescored.json").read_text())
    assert report["split"] == "valid" and report["samples"] == 4 and report["tokens"] == 64
    assert "samples 4..7" in report["which"] and len(report["candidates"]) == 1
    assert report["candidates"][0]["key"] == rows[0]["key"] and np.isfinite(report["candidates"][0]["heldout_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == mode and summary["evaluations"] == 1 and summary["search_flops"] == rows[0]["flops"] > 0
    # the same command again: resumes, evaluates nothing
    before = (out / "results.jsonl").read_text(), (out / "state.json").read_text()
    assert search_main(args) == 0
    assert ((out / "results.jsonl").read_text(), (out / "state.json").read_text()) == before
    return out, config, subnet, rows


def test_width_oneshot_keeps_every_layer_and_the_full_hidden_size(workdir, tmp_path):
    config = ModelConfig(**PARENTS["llama"])
    imp = _importance_file(tmp_path / "imp.safetensors", config).scores
    _, _, subnet, rows = _oneshot(workdir, tmp_path, "width_oneshot", "--importance", str(tmp_path / "imp.safetensors"))
    assert subnet.layers == list(range(config.num_layers)) and subnet.hidden == list(range(config.hidden_size))
    groups, ffn = len(subnet.query_groups[0]), len(subnet.mlp[0])
    assert (groups, ffn) == (1, 32)  # of the in-budget shapes, the one pruning groups and MLP by equal fractions
    expected = SubnetConfig.from_counts(config, num_attention_heads=4 * groups, num_query_groups=groups,
                                        ffn_hidden_size=ffn, importance=imp)  # fmt: skip
    assert subnet == expected  # the most important groups (with all their heads) and neurons
    assert subnet.query_groups[0] == [int(imp.query_groups[0].argmax())]


def test_depth_oneshot_keeps_the_drop_loss_most_important_layers_at_full_width(workdir, tmp_path):
    config = ModelConfig(**PARENTS["llama"])
    drop = _importance_file(tmp_path / "imp.safetensors", config).drop_loss
    _, _, subnet, _ = _oneshot(workdir, tmp_path, "depth_oneshot", "--importance", str(tmp_path / "imp.safetensors"),
                               "--tolerance", "0.1")  # fmt: skip
    n = len(subnet.layers)
    assert n == 2  # 2 of 4 full-width layers: half the non-embedding parameters
    assert subnet.layers == sorted(drop.argsort(descending=True)[:n].tolist())  # drop loss, not the block scores
    full = SubnetConfig.full(config)
    assert subnet.hidden == full.hidden
    assert subnet.heads == [full.heads[i] for i in subnet.layers] and subnet.mlp == [full.mlp[i] for i in subnet.layers]


def test_first_k_slices_the_first_units_of_every_dimension(workdir, tmp_path):
    _, config, subnet, _ = _oneshot(workdir, tmp_path, "first_k")
    n, h = len(subnet.layers), len(subnet.hidden)
    assert subnet.layers == list(range(n)) and subnet.hidden == list(range(h))
    for groups, heads, mlp in zip(subnet.query_groups, subnet.heads, subnet.mlp):
        assert groups == list(range(len(groups))) and heads == list(range(len(heads)))
        assert mlp == list(range(len(mlp)))
    assert n < config.num_layers and h < config.hidden_size and len(subnet.mlp[0]) < config.ffn_hidden_size


@pytest.mark.parametrize(
    "extra, code, texts",
    [
        (["--mode", "width_oneshot"], 2, ["--mode width_oneshot", "--importance"]),
        (["--mode", "depth_oneshot"], 2, ["--mode depth_oneshot", "--importance"]),
        (["--mode", "first_k", "--importance", "IMP"], 2, ["--importance", "first_k"]),
        (["--mode", "first_k", "--space", "index"], 2, ["--space", "first_k"]),
        (["--mode", "first_k", "--target-params", "100"], 1,
         ["--mode first_k", "first-k sub-network", "non-embedding parameters", "--tolerance"]),
        (["--mode", "depth_oneshot", "--importance", "IMP", "--target-params", "0.6", "--tolerance", "0.01"], 1,
         ["--mode depth_oneshot", "depth-only", "the nearest has"]),
        (["--mode", "depth_oneshot", "--importance", "NODROP"], 1, ["--importance", "drop-loss", "--drop-loss-iters"]),
        (["--mode", "width_oneshot", "--importance", "IMP", "--target-params", "0.05"], 1,
         ["--mode width_oneshot", "width-only"]),
    ],
)
def test_oneshot_errors_are_one_line_and_leave_no_output(workdir, tmp_path, capsys, extra, code, texts):
    config = ModelConfig(**PARENTS["llama"])
    _importance_file(tmp_path / "imp.safetensors", config)
    _importance_file(tmp_path / "nodrop.safetensors", config, drop_loss=False)
    paths = {"IMP": str(tmp_path / "imp.safetensors"), "NODROP": str(tmp_path / "nodrop.safetensors")}
    extra = [paths.get(a, a) for a in extra]
    assert _run(cli_args(workdir, tmp_path / "out", *extra)) == code  # a later --target-params wins
    _one_error_line(capsys, *texts)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parent", sorted(PARENTS))
@pytest.mark.parametrize("mode", ["width_oneshot", "depth_oneshot", "first_k"])
@pytest.mark.parametrize("include_embeddings", [False, True])
def test_oneshot_shapes_land_in_budget(parent, mode, include_embeddings):
    from megatron_subnet.search.oneshot import oneshot_genome

    config = ModelConfig(**PARENTS[parent])
    importance = None if mode == "first_k" else random_importance(config)
    space = SearchSpace(config, SpaceConfig(kind="per_layer", include_embeddings=include_embeddings), importance)
    fitted = 0
    for target, tolerance in ((0.5, 0.1), (0.7, 0.15), (0.4, 0.15)):
        budget = make_budget(space.parent_params(), target=target, tolerance=tolerance)
        try:
            g = oneshot_genome(space, mode, budget)
        except SearchSpaceError as e:  # the tiny parents' shapes are coarse: one line naming mode and budget
            low, high = budget.window(0)
            assert str(e).startswith(f"--mode {mode}: no ") and f"{low:,}..{high:,}" in str(e), str(e)
            continue
        fitted += 1
        subnet = space.to_subnet(g)
        low, high = budget.window(0)
        assert low <= subnet.num_parameters(config, include_embeddings) == space.params(g) <= high
        counts = space.param_counts(g)
        assert counts["total_params" if include_embeddings else "non_embedding_params"] == space.params(g)
        if config.arch == "llama":
            assert all(len(subnet.hidden) % len(h) == 0 for h in subnet.heads)
        if mode != "depth_oneshot":
            assert len(set(map(len, subnet.mlp))) == 1 and len(set(map(len, subnet.query_groups))) == 1
    assert fitted >= 1


def test_a_search_saved_before_rescoring_resumes(workdir, tmp_path, capsys):
    """state.json of a search written before held-out re-scoring (no rescore settings, top lists or FLOPs)."""
    out = tmp_path / "out"
    assert search_main(cli_args(workdir, out, "--generations", "1")) == 0
    state = json.loads((out / "state.json").read_text())
    for key in ("top", "search_flops", "rescored"):
        del state[key]
    del state["settings"]["rescore"]
    (out / "state.json").write_text(json.dumps(state))
    assert search_main(cli_args(workdir, out, "--generations", "2")) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["generation"] == 2 and state["settings"]["rescore"] == [5, 2]
    generation_1 = [r for r in read_results(out / "results.jsonl") if r["generation"] == 1]
    assert state["search_flops"] == sum(r["flops"] for r in generation_1) > 0  # counted from the resume on
    assert json.loads((out / "rescored.json").read_text())["candidates"]
    # a search of the sample order before this one scored other batches: refused, not mixed in
    state = json.loads((out / "state.json").read_text())
    del state["settings"]["data_order"]
    (out / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert search_main(cli_args(workdir, out, "--generations", "3")) == 1
    assert "other settings (data_order)" in capsys.readouterr().err
