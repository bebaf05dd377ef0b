"""The paper's claim measured so that its reviewers would accept the answer: random init trained long enough to
cross the sub-network arms, multipliers measured along its curve, paired data, held-out selection, and every
FLOP an arm spent counted.

    python benchmarks/paper_experiment.py --scale {smoke,cpu,gpu} --output DIR [--parent CKPT] \\
        [--data-path PREFIX --extra-valid-data-path PREFIX] [--corpus corpus.jsonl] [--data-seeds S ...] \\
        [--overwrite]

**Inputs.** ``smoke`` builds its own tiny random llama parent and random-token datasets (the plumbing, in the
test suite). ``cpu`` and ``gpu`` use the SmolLM2-135M parent (``--parent``, default ``runs/teacher``, imported
from ``tools/fetch_teacher.py``'s download when missing) and the demo corpus split by source: the documents of
``--heldout-source`` (default ``debian-handbook``, prose unlike the rest) become the second held-out text, the
others the training data (its own valid split is the validation split). Both are tokenized with
``tools/preprocess_data.py`` under ``DIR/data``, unless ``--data-path``/``--extra-valid-data-path`` are given.

**Initialisations**, each at half of the parent's total parameters (``INITS``): the one-shot shapes ``first_k``
(the paper's slicing, no search), ``width`` (Minitron width-only) and ``depth`` (whole layers dropped); ``paper``
(the paper's own arm: evolution over first-k slices, no importance); ``evolution`` and ``random_search`` over
the importance order. Searches pick their winner by held-out loss among their 4 best (``tools/search_subnet.py
--select-by heldout``); evolution opens with the one-shot shapes.

**Arms** (``pretrain_slm.py``, ZeRO-0, one process; warm-up then a constant learning rate, so a longer run's
first steps are a shorter run's, step for step, and on the same data: the data order does not depend on a
run's length):

- every initialisation with KD at our recipe (``kd``: 0.5 CE + 0.5 KL, T = 1), at whittle's (``kdw``: 0.3 CE +
  0.7 KL, T = 10) and with cross-entropy only (``ce``), ``train_iters`` steps for KD; the CE run lasts as many
  steps as cost the KD run's student and teacher FLOPs, so one CE run gives the equal-tokens point (at
  ``train_iters``) and the equal-FLOPs point (its end);
- ``random_init``: random weights in the first-k shape (a standard, uniformly scaled shape of the same size),
  its own recipe (``random_lr``, warm-up over 5% of its steps), ``random_multiple`` times the tokens;
  ``random_init_kd``: the same recipe (so the same warm-up steps) with KD for ``train_iters`` steps, paired
  with random init's first steps (initialisation apart from distillation);
- the arms the decision rests on (``paper`` and ``evolution``, KD and CE) run on every ``--data-seeds`` data
  order, the others (random init included: it is the longest run) on the first, so only the first seed's
  multipliers are paired with random init's data.

**Compute** (each arm's ``flops`` parts): its training, the teacher's forwards, its search (all candidates and
the held-out re-scoring), and of the importance pass only what it used: the calibration forward (``width``,
``evolution``, ``random_search``: activation scores and the block layer scores) or the layer drop loss
(``depth``). Parameters are given total and non-embedding.

**Results** (``DIR/results.json``, ``table.md``, ``curves.png``): every arm's evaluations (tokens, FLOPs,
validation and held-out-text loss); the teacher's own loss on both texts, on the same batches; tokens- and
FLOPs-to-target for every arm against random init at the losses random init reaches at its evaluations
nearest 25/50/75/100% of its budget (``fraction_of_random_budget``; measured, or "not reached within" the
arm's budget); KD minus CE as paired differences over the seeds at equal tokens and at equal FLOPs, whittle's
recipe minus ours, the paper's arm minus evolution; the search proxy's Spearman rho over all candidates and
over its top quarter. A rerun with the same settings reuses the
finished steps; other settings need ``--overwrite`` (or another ``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_subnet.cache import cache_dir  # noqa: E402
from megatron_subnet.cli import ArgumentParser, nonnegative_int, run_main  # noqa: E402
from megatron_subnet.outputs import write_text_atomically  # noqa: E402

TARGET_PARAMS = 0.5  # of the parent's total parameters
SEARCH_DATA_SEED = 4321  # the search's selection batches: other samples of the valid split than the arms' evaluation
SEARCH_SEED = 0
SPEARMAN_SEED = 99
SPLIT = "949,50,1"  # the tools' default --split
RESCORE_TOP = 4  # the searches' held-out re-scoring: the winner is the best of their 4 best on held-out samples


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one scale: the data, the arms' budgets and recipes, the searches and the proxy check."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    train_iters: int  # the sub-network arms' KD budget, a multiple of 4 (evaluations every quarter)
    eval_iters: int
    lr: float  # the sub-network arms': warm-up, then constant
    warmup_iters: int
    random_lr: float  # random init's own recipe: warm-up over 5% of its steps, then constant
    random_multiple: int  # random init trains this many times the KD arms' tokens
    calib_iters: int
    drop_loss_iters: int
    population: int
    generations: int
    elite: int
    fitness_batches: int
    rescore_batches: int
    tolerance: float
    grid: int
    spearman_candidates: int
    spearman_train_steps: int
    bf16: bool = False

    @property
    def random_iters(self) -> int:
        return self.train_iters * self.random_multiple


SCALES = {
    # the plumbing on a tiny random parent: about a minute
    "smoke": Scale(32, 2, 4, 8, 1, 1e-3, 1, 3e-3, 3, 1, 1, 4, 2, 1, 1, 1, 0.15, 8, 12, 2),
    # SmolLM2-135M on this 2-core CPU: about 75 minutes
    "cpu": Scale(256, 4, 4, 16, 4, 3e-4, 2, 1e-3, 15, 4, 2, 8, 3, 2, 2, 2, 0.05, 64, 12, 4),
    # one H200, about 10 minutes (sized, not yet run): ~4M tokens per KD arm, random init 10x
    "gpu": Scale(1024, 8, 32, 128, 8, 6e-4, 10, 2e-3, 10, 16, 8, 16, 6, 2, 8, 8, 0.05, 64, 16, 20, bf16=True),
}

# initialisation -> (search_subnet.py --mode, label, the importance parts it used)
INITS = {
    "first_k": ("first_k", "first-k slice (one-shot)", ()),
    "width": ("width_oneshot", "Minitron width-only (one-shot)", ("calibration",)),
    "depth": ("depth_oneshot", "depth-only (one-shot)", ("drop_loss",)),
    "paper": ("evolution", "evolution over first-k slices (the paper's)", ()),
    "evolution": ("evolution", "evolution over importance order", ("calibration",)),
    "random_search": ("random", "random search over importance order", ("calibration",)),
}
DECISION_INITS = ("paper", "evolution")  # run on every data seed (KD and CE), with random init
# objective -> (kd alpha, kd temperature, label); None: cross-entropy only
OBJECTIVES = {"kd": (0.5, 1.0, "KD (ours: 0.5, T=1)"), "kdw": (0.7, 10.0, "KD (whittle: 0.7, T=10)"),
              "ce": None}  # fmt: skip


class ExperimentError(ValueError):
    """Bad input or a step that failed: one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), required=True)
    p.add_argument("--output", required=True, help="directory for every step's outputs and the results")
    p.add_argument("--parent", help="our checkpoint of the parent (default: runs/teacher; smoke: a tiny one)")
    p.add_argument("--data-path", help="training dataset prefix (default: made from --corpus)")
    p.add_argument("--extra-valid-data-path", help="the second held-out text's prefix (default: from --corpus)")
    p.add_argument("--corpus", default=str(cache_dir() / "demo_corpus" / "corpus.jsonl"))
    p.add_argument("--heldout-source", default="debian-handbook", help="corpus source held out as the second text")
    p.add_argument("--data-seeds", type=nonnegative_int, nargs="+", default=None,
                   help="data orders (pretrain_slm.py --seed) of the decision arms (default: 1234 1235 1236; "
                   "smoke: 1234 1235); the other arms use the first")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="start anew in an --output of other settings")
    args = p.parse_args(argv)
    if args.data_seeds is None:
        args.data_seeds = [1234, 1235] if args.scale == "smoke" else [1234, 1235, 1236]
    if len(set(args.data_seeds)) != len(args.data_seeds):
        p.error(f"argument --data-seeds: repeated seed in {args.data_seeds}")
    return args


# ----------------------------------------------------------------------------- inputs


def build_smoke_inputs(root: Path) -> tuple[Path, Path, Path]:
    """A tiny random llama parent and random-token training / held-out datasets."""
    import numpy as np
    import torch

    from megatron_subnet.data.indexed import IndexedDatasetBuilder
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.weights import save_checkpoint

    parent, data, heldout = root / "parent", root / "train", root / "heldout"
    if not (parent / "model_config.json").exists():
        torch.manual_seed(0)
        config = ModelConfig(arch="llama", vocab_size=128, hidden_size=64, num_layers=4, num_attention_heads=4,
                             num_query_groups=2, head_dim=16, ffn_hidden_size=128,
                             tie_word_embeddings=True)  # fmt: skip
        save_checkpoint(parent, config, GPTModel(config).state_dict())
    rng = np.random.default_rng(0)
    for prefix, docs in ((data, 400), (heldout, 40)):
        if not Path(f"{prefix}.idx").exists():
            with IndexedDatasetBuilder(prefix, np.uint16) as builder:
                for _ in range(docs):
                    builder.add_document(rng.integers(0, 127, rng.integers(20, 120)))
    return parent, data, heldout

def split_corpus(corpus: Path, heldout_source: str, out: Path) -> tuple[Path, Path]:
    """The corpus's documents of ``heldout_source`` and all the others, as two JSONL files."""
    train, heldout = out / "train.jsonl", out / "heldout.jsonl"
    if train.exists() and heldout.exists():
        return train, heldout
    counts = [0, 0]
    tmp_train, tmp_heldout = train.with_suffix(".jsonl.tmp"), heldout.with_suffix(".jsonl.tmp")
    with open(corpus, "rb") as f, open(tmp_train, "wb") as a, open(tmp_heldout, "wb") as b:
        for line in f:
            source = str(json.loads(line).get("source", ""))
            held = source == heldout_source or source.startswith(heldout_source + "/")
            (b if held else a).write(line)
            counts[held] += 1
    if not counts[1]:
        tmp_train.unlink()
        tmp_heldout.unlink()
        raise ExperimentError(f"--heldout-source {heldout_source}: no document of {corpus} has that source")
    os.replace(tmp_train, train)
    os.replace(tmp_heldout, heldout)
    print(f"corpus split: {counts[0]} training documents, {counts[1]} held out ({heldout_source})")
    return train, heldout

def prepare_inputs(args: argparse.Namespace, out: Path) -> tuple[Path, str, str]:
    """(parent checkpoint, training prefix, held-out prefix), made when not given."""
    from megatron_subnet.data.indexed import dataset_exists

    if args.scale == "smoke" and args.parent is None:
        parent, data, heldout = build_smoke_inputs(out / "inputs")
        return parent, args.data_path or str(data), args.extra_valid_data_path or str(heldout)
    parent = Path(args.parent or ROOT / "runs" / "teacher")
    if not (parent / "model_config.json").exists():
        if args.parent is not None:
            raise ExperimentError(f"--parent {parent}: not our checkpoint (no model_config.json)")
        hf = cache_dir() / "smollm2-135m-instruct"
        if not (hf / "config.json").exists():
            raise ExperimentError(f"{hf}: missing; run tools/fetch_teacher.py --output {hf} first")
        call("tools/convert_checkpoint.py import", ["import", "--input", str(hf), "--output", str(parent)])
    for flag, prefix in (("--data-path", args.data_path), ("--extra-valid-data-path", args.extra_valid_data_path)):
        if prefix is not None and not dataset_exists(prefix):
            raise ExperimentError(f"{flag} {prefix}: no such file {prefix}.bin/.idx")
    prefixes = []
    for name, given in (("train", args.data_path), ("heldout", args.extra_valid_data_path)):
        if given is not None:
            prefixes.append(given)
            continue
        if not Path(args.corpus).exists():
            raise ExperimentError(f"--corpus {args.corpus}: no such file (tools/fetch_demo_corpus.py makes it)")
        (out / "data").mkdir(parents=True, exist_ok=True)
        jsonl = split_corpus(Path(args.corpus), args.heldout_source, out / "data")[name == "heldout"]
        prefix = out / "data" / name
        if not dataset_exists(f"{prefix}_text_document"):
            call("tools/preprocess_data.py", [
                "--input", str(jsonl), "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", str(parent), "--append-eod", "--workers", "2",
            ])  # fmt: skip
        prefixes.append(f"{prefix}_text_document")
    return parent, prefixes[0], prefixes[1]


# ----------------------------------------------------------------------------- steps


def call(tool: str, argv: list[str]) -> None:
    """Run one of the project's entry points in this process; ExperimentError when it fails."""
    if tool == "pretrain_slm.py":
        from megatron_subnet.pretrain import main
    elif tool == "tools/search_subnet.py":
        from tools.search_subnet import main
    elif tool == "tools/compute_importance.py":
        from tools.compute_importance import main
    elif tool == "tools/preprocess_data.py":
        from tools.preprocess_data import main
    else:
        from tools.convert_checkpoint import main
    print(f"\n== {tool} {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise ExperimentError(f"{tool} failed (exit {code}); its error is above")

def run_importance(parent: Path, data: str, scale: Scale, out: Path, device: str) -> dict:
    """Activation importance and layer drop loss; the FLOPs of each part."""
    from safetensors import safe_open

    path = out / "importance.safetensors"
    if not path.exists():
        call("tools/compute_importance.py", [
            "--load", str(parent), "--data-path", data, "--seq-length", str(scale.seq_length),
            "--micro-batch-size", str(scale.micro_batch_size), "--calib-iters", str(scale.calib_iters),
            "--drop-loss-iters", str(scale.drop_loss_iters), "--seed", str(SEARCH_DATA_SEED), "--device", device,
            "--output", str(path),
        ])  # fmt: skip
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return {"path": str(path), "calibration": int(meta["calibration_flops"]), "drop_loss": int(meta["drop_loss_flops"])}


def run_search(key: str, parent: Path, data: str, scale: Scale, importance: str, out: Path, device: str) -> dict:
    """The search (or one-shot) run of initialisation ``key``; its winner and the FLOPs it spent."""
    mode, _, parts = INITS[key]
    directory = out / key
    if not (directory / "summary.json").exists() or not (directory / "rescored.json").exists():
        argv = [
            "--load", str(parent), "--data-path", data, "--seq-length", str(scale.seq_length),
            "--micro-batch-size", str(scale.micro_batch_size), "--fitness-batches", str(scale.fitness_batches),
            "--target-params", str(TARGET_PARAMS), "--tolerance", str(scale.tolerance), "--include-embeddings",
            "--grid", str(scale.grid), "--mode", mode, "--seed", str(SEARCH_SEED),
            "--data-seed", str(SEARCH_DATA_SEED), "--rescore-top", str(RESCORE_TOP), "--select-by", "heldout",
            "--rescore-batches", str(scale.rescore_batches), "--device", device, "--output", str(directory),
            "--overwrite",  # an unfinished search here (no summary) restarts
        ]  # fmt: skip
        if parts:
            argv += ["--importance", importance, "--layer-metric", "drop_loss" if "drop_loss" in parts else "block"]
        if mode in ("evolution", "random"):
            argv += ["--space", "uniform", "--population", str(scale.population),
                     "--generations", str(scale.generations), "--elite", str(scale.elite)]  # fmt: skip
        call("tools/search_subnet.py", argv)
    summary = json.loads((directory / "summary.json").read_text())
    rescored = json.loads((directory / "rescored.json").read_text())["candidates"]
    by_selection = min(rescored, key=lambda r: (r["selection_loss"], r["key"]))
    return {
        "init": key,
        "mode": mode,
        "subnet": str(directory / "best_subnet.json"),
        "evaluations": summary["evaluations"],
        "flops": int(summary["search_flops"]) + int(summary.get("rescore_flops") or 0),
        "selected_by": summary["selected_by"],
        "winner": {k: summary["best"].get(k) for k in ("key", "loss", "heldout_loss", "total_params",
                                                       "non_embedding_params")},  # fmt: skip
        "in_sample_pick": {"key": by_selection["key"], "loss": by_selection["selection_loss"],
                           "heldout_loss": by_selection["heldout_loss"]},  # fmt: skip
        "rescored": [{k: r[k] for k in ("key", "selection_loss", "heldout_loss")} for r in rescored],
    }


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training run: its initialisation (a search's winner, or random weights in ``shape``'s shape), its
    objective, data seed, steps and recipe."""

    init: str  # an INITS key, or "random"
    objective: str  # an OBJECTIVES key
    seed: int
    iters: int
    lr: float
    warmup_iters: int
    eval_interval: int

    @property
    def name(self) -> str:
        return f"{'random_init' if self.init == 'random' else self.init}_{self.objective}"

    @property
    def directory(self) -> str:
        return f"{self.name}_seed{self.seed}"


def train_arm(arm: Arm, subnet: str, parent: Path, data: str, heldout: str, scale: Scale, out: Path) -> list[dict]:
    """Run one arm (reusing a finished one); its evaluations with tokens and training/teacher FLOPs."""
    log_dir = out / "arms" / arm.directory
    done = log_dir / "evaluations.json"
    if not done.exists():
        ds_config = out / "ds_config.json"
        config = {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0, "bf16": {"enabled": scale.bf16}}
        write_text_atomically(ds_config, json.dumps(config))
        argv = [
            "--ds_config", str(ds_config), "--parent-load", str(parent), "--subnet", subnet,
            "--init", "random" if arm.init == "random" else "subnet",
            "--data-path", data, "--split", SPLIT, "--extra-valid-data-path", heldout,
            "--seq-length", str(scale.seq_length),
            "--micro-batch-size", str(scale.micro_batch_size), "--global-batch-size", str(scale.global_batch_size),
            "--train-iters", str(arm.iters), "--lr", str(arm.lr), "--min-lr", str(arm.lr),
            "--lr-warmup-iters", str(arm.warmup_iters), "--lr-decay-style", "constant", "--seed", str(arm.seed),
            "--eval-interval", str(arm.eval_interval), "--eval-iters", str(scale.eval_iters), "--log-interval", "1",
            "--log-dir", str(log_dir), "--overwrite",  # an unfinished arm (no evaluations.json) restarts
        ]  # fmt: skip
        objective = OBJECTIVES[arm.objective]
        if objective is None:
            argv += ["--kd-alpha", "0"]
        else:
            argv += ["--teacher-load", str(parent), "--kd-alpha", str(objective[0]),
                     "--kd-temperature", str(objective[1])]  # fmt: skip
        argv += ["--bf16"] if scale.bf16 else []
        call("pretrain_slm.py", argv)
        write_text_atomically(done, json.dumps(read_evaluations(log_dir / "metrics.jsonl"), indent=1))
    return json.loads(done.read_text())


def teacher_losses(parent: Path, data: str, heldout: str, scale: Scale, seed: int, device: str) -> dict:
    """The parent's own loss on the arms' evaluation batches (the first ``eval_iters`` micro-batches of each
    text, in the data order of ``seed``), as the trainer evaluates them."""
    from megatron_subnet.data.batches import load_batches
    from megatron_subnet.model.evaluation import evaluate_model
    from megatron_subnet.search.fitness import load_parent

    model = load_parent(parent, device)
    sizes = (scale.seq_length, scale.micro_batch_size, scale.eval_iters, seed)
    out = {}
    for key, (prefix, split) in {"valid_loss": (data, SPLIT), "heldout_loss": (heldout, "0,1,0")}.items():
        batches = load_batches(prefix, split, "valid", *sizes)
        out[key] = evaluate_model(model, batches, device, progress=False).loss
    return out


def read_evaluations(metrics: Path) -> list[dict]:
    """The evaluation records of a run's metrics.jsonl, each with the cumulative FLOPs of its iteration."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    flops = {r["iteration"]: (r["train_flops"], r["teacher_flops"]) for r in records if "train_flops" in r}
    flops[0] = (0.0, 0.0)
    evaluations = []
    for r in records:
        if "valid_loss" in r:
            train, teacher = flops[r["iteration"]]
            evaluations.append({"iteration": r["iteration"], "tokens": r["tokens"], "train_flops": train,
                                "teacher_flops": teacher, "valid_loss": r["valid_loss"],
                                "heldout_loss": r["extra_valid_loss"]})  # fmt: skip
    bad = [e for e in evaluations if not (math.isfinite(e["valid_loss"]) and math.isfinite(e["heldout_loss"]))]
    if not evaluations or bad:
        raise ExperimentError(f"{metrics}: {'no evaluations' if not evaluations else 'non-finite losses'}")
    return evaluations

def proxy_check(parent: Path, data: str, scale: Scale, importance: str, out: Path, device: str) -> dict:
    """Untrained fitness vs loss after a short distillation, over random in-budget candidates."""
    path = out / "spearman.json"
    if path.exists():
        return json.loads(path.read_text())
    import numpy as np

    from megatron_subnet.data.batches import load_batches
    from megatron_subnet.model.importance import load_importance
    from megatron_subnet.search.fitness import FitnessConfig, SubnetFitness, load_heldout_batches, load_parent
    from megatron_subnet.search.space import SearchSpace, SpaceConfig, make_budget

    print(f"\n== proxy check: {scale.spearman_candidates} candidates, untrained vs "
          f"{scale.spearman_train_steps} distillation steps", flush=True)  # fmt: skip
    model = load_parent(parent, device)
    space = SearchSpace(model.config, SpaceConfig(kind="uniform", grid=scale.grid, include_embeddings=True),
                        load_importance(importance, "block", model.config))  # fmt: skip
    budget = make_budget(space.parent_params(), TARGET_PARAMS, scale.tolerance)
    low, high = budget.window(0)
    rng = np.random.default_rng(SPEARMAN_SEED)
    genomes, keys = [], set()
    for _ in range(50 * scale.spearman_candidates):
        g = space.sample(rng, low, high)
        if g is not None and space.key(g) not in keys:
            genomes.append(g)
            keys.add(space.key(g))
        if len(genomes) == scale.spearman_candidates:
            break
    if len(genomes) < scale.spearman_candidates:
        raise ExperimentError(f"the proxy check found {len(genomes)} distinct in-budget candidates, needs "
                              f"{scale.spearman_candidates}")  # fmt: skip
    sizes = (scale.seq_length, scale.micro_batch_size)
    batches = {split: load_batches(data, SPLIT, split, *sizes, n, SEARCH_DATA_SEED)
               for split, n in (("valid", scale.fitness_batches), ("train", scale.spearman_train_steps))}  # fmt: skip
    heldout, heldout_info = load_heldout_batches(data, SPLIT, *sizes, scale.rescore_batches, SEARCH_DATA_SEED,
                                                 scale.fitness_batches * scale.micro_batch_size)  # fmt: skip
    untrained = SubnetFitness(model, batches["valid"])
    recipe = FitnessConfig(train_steps=scale.spearman_train_steps, lr=scale.lr, kd_alpha=OBJECTIVES["kd"][0])
    trained = SubnetFitness(model, heldout, batches["train"], recipe)
    rows, flops = [], 0
    for i, g in enumerate(genomes):
        subnet = space.to_subnet(g)
        (before, _, f1), (after, _, f2) = untrained.timed_loss(subnet), trained.timed_loss(subnet)
        flops += f1 + f2
        counts = space.param_counts(g)
        rows.append({"key": space.key(g), "untrained_loss": before, "trained_loss": after, **counts,
                     "config": space.summary(g)})  # fmt: skip
        print(f"  candidate {i + 1}/{len(genomes)}: untrained {before:.4f}, after training {after:.4f}", flush=True)
    rho = spearman([r["untrained_loss"] for r in rows], [r["trained_loss"] for r in rows])
    top = sorted(rows, key=lambda r: r["untrained_loss"])[: max(3, len(rows) // 4)]  # where a search chooses
    rho_top = spearman([r["untrained_loss"] for r in top], [r["trained_loss"] for r in top])
    result = {"rho": rho, "rho_top": rho_top, "top": len(top), "candidates": rows,
              "train_steps": scale.spearman_train_steps, "flops": flops,
              "untrained_on": f"the search's selection samples (valid split, data seed {SEARCH_DATA_SEED})",
              "trained_on": f"the train split's first samples; scored on {heldout_info['which']}"}  # fmt: skip
    write_text_atomically(path, json.dumps(result, indent=1))
    return result

def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result

def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks); NaN when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else float("nan")


# ----------------------------------------------------------------------------- results


def reach(curve: list[dict], target: float, axis: str) -> float | None:
    """The first ``axis`` value at which the loss curve reaches ``target`` (linear between evaluations)."""
    previous = None
    for point in curve:
        if point["valid_loss"] <= target:
            if previous is None:
                return point[axis]
            x0, y0, x1, y1 = previous[axis], previous["valid_loss"], point[axis], point["valid_loss"]
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
        previous = point
    return None

def arm_record(arm: Arm, label: str, search: dict | None, parts: dict[str, int], evaluations: list[dict],
               counts: dict) -> dict:  # fmt: skip
    """One arm of results.json: ``parts`` are the FLOPs spent before its first step (search, importance)."""
    start = sum(parts.values())
    points = [{**e, "flops": start + e["train_flops"] + e["teacher_flops"]} for e in evaluations]
    return {"name": arm.name, "label": label, "init": arm.init, "objective": arm.objective, "seed": arm.seed,
            "iters": arm.iters, "lr": arm.lr, "warmup_iters": arm.warmup_iters,
            "search": search["init"] if search else None, "start_flops": parts, **counts,
            "evaluations": points}  # fmt: skip


def at_iteration(arm: dict, iteration: int) -> dict:
    """The arm's evaluation at ``iteration`` (KeyError-free: ExperimentError when it has none there)."""
    for e in arm["evaluations"]:
        if e["iteration"] == iteration:
            return e
    raise ExperimentError(f"arm {arm['name']} seed {arm['seed']}: no evaluation at iteration {iteration}")


def to_target(arms: list[dict]) -> dict:
    """Tokens- and FLOPs-to-target of every arm against random init, at the validation losses random init
    reaches at 25/50/75/100% of its budget: measured where the arm's curve reaches the target (interpolated
    between evaluations), else ``None`` ("not reached within" the arm's last evaluation)."""
    baseline = next(a for a in arms if a["name"] == "random_init_ce")
    ev = baseline["evaluations"]
    picks = [ev[max(1, round(k * (len(ev) - 1) / 4))] for k in range(1, 5)]
    targets = []
    for point in picks:
        target = point["valid_loss"]
        base = {axis: reach(ev, target, axis) for axis in ("tokens", "flops")}
        rows = []
        for arm in arms:
            if arm is baseline:
                continue
            used = {axis: reach(arm["evaluations"], target, axis) for axis in ("tokens", "flops")}
            row = {"name": arm["name"], "seed": arm["seed"], "reached": used["tokens"] is not None,
                   "at_start": used["tokens"] == 0}  # fmt: skip
            for axis in ("tokens", "flops"):  # at the start (0 tokens, or 0 FLOPs) no ratio: marked at_start
                row[axis] = used[axis]
                row[f"{axis}_multiplier"] = base[axis] / used[axis] if used[axis] else None
                row[f"{axis}_budget"] = arm["evaluations"][-1][axis]
            rows.append(row)
        targets.append({"fraction_of_random_budget": point["iteration"] / ev[-1]["iteration"],
                        "target_loss": target, "random_init": base, "arms": rows})  # fmt: skip
    return {"baseline": "random_init_ce", "targets": targets}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value), n and the values."""
    return {"mean": sum(values) / len(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}  # fmt: skip


def paired_differences(arms: list[dict], train_iters: int) -> dict:
    """Final validation-loss differences of arms on the same data order (negative: the first is better):
    KD minus CE per initialisation at equal tokens and equal FLOPs, whittle's KD minus ours, the paper's
    arm minus evolution (KD), random init + KD minus random init at equal tokens."""
    by = {(a["name"], a["seed"]): a for a in arms}
    out = {}

    def pairs(first: str, second: str, where_first, where_second) -> dict | None:
        seeds = sorted(s for n, s in by if n == first and (second, s) in by)
        if not seeds:
            return None
        values = [where_first(by[first, s])["valid_loss"] - where_second(by[second, s])["valid_loss"] for s in seeds]
        return {**spread(values), "seeds": seeds}

    last = lambda a: a["evaluations"][-1]  # noqa: E731
    at_budget = lambda a: at_iteration(a, train_iters)  # noqa: E731
    for init in INITS:
        out[f"{init}: kd - ce, equal tokens"] = pairs(f"{init}_kd", f"{init}_ce", last, at_budget)
        out[f"{init}: kd - ce, equal FLOPs"] = pairs(f"{init}_kd", f"{init}_ce", last, last)
        out[f"{init}: kdw - kd"] = pairs(f"{init}_kdw", f"{init}_kd", last, last)
    out["paper - evolution (kd)"] = pairs("paper_kd", "evolution_kd", last, last)
    out["random init: kd - ce, equal tokens"] = pairs("random_init_kd", "random_init_ce", last, at_budget)
    return {k: v for k, v in out.items() if v is not None}


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def write_table(results: dict, path: Path) -> None:
    scale, t = results["scale"], results["teacher"]
    tokens_per_step = scale["global_batch_size"] * scale["seq_length"]
    lines = [
        f"Scale `{results['scale_name']}`: parent {results['parent']['total_params']:,} parameters "
        f"({results['parent']['non_embedding_params']:,} non-embedding); every student at {TARGET_PARAMS:.0%} of its "
        f"total parameters; {tokens_per_step:,} tokens per step; KD arms {scale['train_iters']} steps at lr "
        f"{scale['lr']:g}, random init {scale['train_iters'] * scale['random_multiple']} steps at lr "
        f"{scale['random_lr']:g} (warm-up, then constant). Data seeds {results['data_seeds']}.",
        "",
        f"Teacher (the parent itself): validation loss {t['valid_loss']:.3f}, held-out text {t['heldout_loss']:.3f}.",
        "",
        "| arm | seed | total / non-emb. params | steps | FLOPs before step 1 | FLOPs at the end | valid loss: start "
        "/ KD budget / end | held-out text: start / end |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for arm in results["arms"]:
        ev = arm["evaluations"]
        mid = next((e for e in ev if e["iteration"] == scale["train_iters"]), ev[-1])
        lines.append(
            f"| {arm['label']} | {arm['seed']} | {arm['total_params']:,} / {arm['non_embedding_params']:,} | "
            f"{arm['iters']} | {sum(arm['start_flops'].values()):.3g} | {ev[-1]['flops']:.3g} | "
            f"{ev[0]['valid_loss']:.3f} / {mid['valid_loss']:.3f} / {ev[-1]['valid_loss']:.3f} | "
            f"{ev[0]['heldout_loss']:.3f} / {ev[-1]['heldout_loss']:.3f} |"
        )
    fractions = " / ".join(f"{t['fraction_of_random_budget']:.0%}" for t in results["to_target"]["targets"])
    lines += ["", f"To random init's loss at {fractions} of its budget: tokens multiplier (random init's "
              "tokens over the arm's) / FLOPs multiplier (likewise, the arm's search and importance included); "
              "'at start': the arm's initial loss is already below; '—': not reached within the arm's budget.", "",
              "| arm | seed | " + " | ".join(f"{p['target_loss']:.3f}" for p in results["to_target"]["targets"])
              + " |", "|---|---:|" + "---|" * len(results["to_target"]["targets"])]  # fmt: skip
    rows = results["to_target"]["targets"][0]["arms"]
    for i, row in enumerate(rows):
        cells = []
        for target in results["to_target"]["targets"]:
            r = target["arms"][i]
            if not r["reached"]:
                cells.append("—")
            else:
                tokens = "at start" if r["at_start"] else f"{r['tokens_multiplier']:.2f}x"
                cells.append(f"{tokens} / {_fmt(r['flops_multiplier'], '.2f')}x")
        lines.append(f"| {row['name']} | {row['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences of the final validation loss (same data order; negative: the first is "
              "better):", "", "| comparison | mean | std | n |", "|---|---:|---:|---:|"]  # fmt: skip
    for name, d in results["paired"].items():
        lines.append(f"| {name} | {d['mean']:+.3f} | {_fmt(d['std'], '.3f')} | {d['n']} |")
    s = results["spearman"]
    lines += ["", f"Search proxy: Spearman rho {s['rho']:.3f} between untrained fitness and the loss after "
              f"{s['train_steps']} distillation steps over {len(s['candidates'])} random in-budget candidates; "
              f"{_fmt(s['rho_top'], '.3f')} over the proxy's best {s['top']}."]  # fmt: skip
    for search in results["searches"].values():
        if search["mode"] in ("evolution", "random"):
            w, p = search["winner"], search["in_sample_pick"]
            lines.append(f"- {search['init']}: winner by held-out loss {w['heldout_loss']:.3f} (selection "
                         f"{w['loss']:.3f}); the in-sample pick {p['heldout_loss']:.3f} (selection {p['loss']:.3f})")
    write_text_atomically(path, "\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    first = results["data_seeds"][0]
    inits = list(dict.fromkeys(arm["init"] for arm in results["arms"]))  # one colour per initialisation
    for arm in results["arms"]:
        if arm["seed"] != first:
            continue
        ev = arm["evaluations"]
        style = {"ce": "--", "kd": "-", "kdw": ":"}[arm["objective"]]
        line = dict(color=f"C{inits.index(arm['init']) % 10}", lw=2.5 if arm["init"] == "random" else 1.2)
        axes[0].plot([e["tokens"] for e in ev], [e["valid_loss"] for e in ev], style, label=arm["label"], **line)
        axes[1].plot([e["flops"] for e in ev], [e["valid_loss"] for e in ev], style, **line)
    tokens_per_step = results["scale"]["global_batch_size"] * results["scale"]["seq_length"]
    for ax in axes:
        ax.axhline(results["teacher"]["valid_loss"], color="k", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=tokens_per_step)  # the start (0 tokens) stays on the plot
    axes[0].set_xlim(left=0)
    axes[1].set_xscale("log")
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("FLOPs (training + teacher forwards + search and the importance parts used)")
    axes[0].set_ylabel("validation loss (black line: the teacher's)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"students at {TARGET_PARAMS:.0%} of the parent's parameters ({results['scale_name']}, data seed "
                 f"{first}); dashed: CE only, dotted: whittle's KD recipe, thick: random init")  # fmt: skip
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def check_output_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse an --output holding another experiment's steps unless --overwrite (then they are removed)."""
    path = out / "experiment.json"
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--output {out}: exists and is not a directory")
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            if not overwrite:
                changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
                raise ExperimentError(f"--output {out}: holds an experiment of other settings ({', '.join(changed)}); "
                                      "use another --output or pass --overwrite")  # fmt: skip
            for name in ("inputs", "data", "search", "arms", "importance.safetensors", "spearman.json",
                         "results.json", "table.md", "curves.png"):  # fmt: skip
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ExperimentError(f"--output {out}: not empty and not an experiment's directory; pass --overwrite or "
                              "choose another")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(settings, indent=1))

def plan_arms(scale: Scale, seeds: list[int]) -> list[Arm]:
    """Every arm, the CE ones last in each group (their length follows their KD arm's FLOPs)."""
    quarter = scale.train_iters // 4
    random = dict(lr=scale.random_lr, warmup_iters=max(1, scale.random_iters // 20))
    arms = [Arm("random", "ce", seed, scale.random_iters, eval_interval=2 * quarter, **random) for seed in seeds[:1]]
    arms += [Arm("random", "kd", seeds[0], scale.train_iters, eval_interval=quarter, **random)]
    for init in INITS:
        for objective in OBJECTIVES:
            on = seeds if init in DECISION_INITS and objective != "kdw" else seeds[:1]
            recipe = (scale.train_iters, scale.lr, scale.warmup_iters, quarter)
            arms += [Arm(init, objective, seed, *recipe) for seed in on]
    return arms


def equal_flops_iters(kd: dict, scale: Scale) -> int:
    """CE steps costing the KD arm's student and teacher FLOPs, rounded to whole evaluation intervals."""
    last, quarter = kd["evaluations"][-1], scale.train_iters // 4
    per_step = last["train_flops"] / last["iteration"]
    return quarter * max(1, round((last["train_flops"] + last["teacher_flops"]) / per_step / quarter))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    start = time.time()
    scale = SCALES[args.scale]
    out = Path(args.output)
    settings = {"scale": args.scale, "sizes": dataclasses.asdict(scale), "data_seeds": args.data_seeds,
                "parent": args.parent, "data_path": args.data_path, "extra_valid_data_path": args.extra_valid_data_path,
                "heldout_source": args.heldout_source, "version": 2}  # fmt: skip
    check_output_dir(out, settings, args.overwrite)
    import torch

    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config

    device = "cuda" if args.scale == "gpu" and torch.cuda.is_available() else "cpu"
    parent, data, heldout = prepare_inputs(args, out)
    parent_config = load_config(parent)
    importance = run_importance(parent, data, scale, out, device)
    searches = {key: run_search(key, parent, data, scale, importance["path"], out / "search", device)
                for key in INITS}  # fmt: skip

    def counts(subnet_path: str) -> dict:
        config = SubnetConfig.load(subnet_path, parent_config).student_config(parent_config)
        return {"total_params": config.num_parameters(), "non_embedding_params": config.num_parameters(False)}

    arms, kd_of = [], {}
    for arm in plan_arms(scale, args.data_seeds):
        if arm.objective == "ce" and arm.init != "random":
            arm = dataclasses.replace(arm, iters=equal_flops_iters(kd_of[arm.init, arm.seed], scale))
        search = None if arm.init == "random" else searches[arm.init]
        subnet = searches["first_k"]["subnet"] if search is None else search["subnet"]  # random: first-k's shape
        parts = {} if search is None else {"search": search["flops"],
                                           **{p: importance[p] for p in INITS[arm.init][2]}}  # fmt: skip
        objective = OBJECTIVES[arm.objective]
        init_label = "random init" if search is None else INITS[arm.init][1]
        label = f"{init_label}, {'CE' if objective is None else objective[2]}"
        evaluations = train_arm(arm, subnet, parent, data, heldout, scale, out)
        record = arm_record(arm, label, search, parts, evaluations, counts(subnet))
        arms.append(record)
        if arm.objective == "kd":
            kd_of[arm.init, arm.seed] = record
    proxy = proxy_check(parent, data, scale, importance["path"], out, device)
    results = {
        "scale_name": args.scale,
        "scale": dataclasses.asdict(scale),
        "date": time.strftime("%Y-%m-%d"),
        "data_seeds": args.data_seeds,
        "target_params": f"{TARGET_PARAMS} of the parent's total parameters",
        "parent": {"path": str(parent), "total_params": parent_config.num_parameters(),
                   "non_embedding_params": parent_config.num_parameters(False)},  # fmt: skip
        "data": {"train": data, "heldout_text": heldout, "split": SPLIT},
        "teacher": teacher_losses(parent, data, heldout, scale, args.data_seeds[0], device),
        "importance_flops": {"calibration": importance["calibration"], "drop_loss": importance["drop_loss"]},
        "searches": searches,
        "arms": arms,
        "to_target": to_target(arms),
        "paired": paired_differences(arms, scale.train_iters),
        "spearman": proxy,
        "seconds_this_invocation": time.time() - start,  # steps reused from an earlier run cost nothing here
    }
    write_text_atomically(out / "results.json", json.dumps(results, indent=1))
    write_table(results, out / "table.md")
    plot(results, out / "curves.png")
    print("\n" + (out / "table.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'table.md'}, {out / 'curves.png'} ({time.time() - start:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
