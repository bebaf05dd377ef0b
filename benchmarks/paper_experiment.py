"""The paper's claim measured with its reviewers' controls: every initialisation arm at one parameter budget,
equal tokens, equal data order and schedule, search and importance compute counted.

    python benchmarks/paper_experiment.py --scale {smoke,cpu,gpu} --output DIR [--parent CKPT] \\
        [--data-path PREFIX --extra-valid-data-path PREFIX] [--corpus corpus.jsonl] [--overwrite]

**Inputs.** ``smoke`` builds its own tiny random llama parent and random-token datasets (the plumbing, in the
test suite). ``cpu`` and ``gpu`` use the SmolLM2-135M parent (``--parent``, default ``runs/teacher``, imported
from ``tools/fetch_teacher.py``'s download when missing) and the demo corpus split by source: the documents of
``--heldout-source`` (default ``debian-handbook``, prose unlike the rest) become the second held-out text, the
others the training data (its own valid split is the project's validation split). Both are tokenized with
``tools/preprocess_data.py`` under ``DIR/data``, unless ``--data-path``/``--extra-valid-data-path`` are given.

**Steps** (each tool run in this process through its ``main``; outputs under ``DIR``):

1. ``tools/compute_importance.py``: activation importance and layer drop loss on training batches;
2. ``tools/search_subnet.py`` at ``--target-params 0.5 --include-embeddings`` (half of the parent's *total*
   parameters): the one-shot modes ``first_k``, ``width_oneshot`` (Minitron width-only) and ``depth_oneshot``,
   then ``evolution`` and ``random`` (same evaluations) for every ``--seeds`` seed, each with held-out
   re-scoring of its best candidates;
3. ``pretrain_slm.py`` (ZeRO-0, one process) for every arm, same ``--seed`` (data order), batch, schedule and
   token budget, evaluated at 0/25/50/75/100% of the budget on the validation split and the held-out text:

   - ``random_init``: Megatron's random init of the evolution winner's shape (seed of the first ``--seeds``),
     cross-entropy only: the from-scratch baseline;
   - ``first_k_kd``, ``width_oneshot_kd``, ``depth_oneshot_kd``: the one-shot sub-networks, distilled;
   - ``evolution_kd`` and ``random_search_kd``: each seed's search winner, distilled;
   - ``evolution_ce_tokens``: the evolution winner, cross-entropy only, the same tokens;
   - ``evolution_ce_flops``: the same at the KD arm's FLOPs (more steps: the KD arm pays for its teacher).

4. the proxy check: ``--spearman-candidates`` random in-budget sub-networks of the same space, each scored
   untrained (masked parent, the search's fitness) and after a short distillation (``--spearman-train-steps``
   AdamW steps from the parent, ``SubnetFitness``'s ``train_steps`` path) on held-out batches (the test split);
   their Spearman rank correlation.

**Compute.** A curve's FLOPs are the student's training FLOPs (3x forward) plus the teacher's forwards, plus,
at its start, the FLOPs of the importance pass and of the search that produced its initialisation (one-shot
modes: their one evaluation). ``random_init`` is charged no search (it only borrows the shape).

**Multipliers** (``results.json`` ``multipliers``), of ``evolution_kd`` (mean over seeds) over
``random_init``: the tokens (FLOPs) random init needs to reach the KD arm's final validation loss, over the
KD arm's tokens (FLOPs) -- a lower bound when random init never gets there within its budget; and the other
way round, the paper's direction: the tokens the KD arm needs to reach random init's final loss.

**Outputs.** ``DIR/results.json`` (every arm: name, seed, init, KD, total and non-embedding parameters, every
evaluation with tokens and FLOPs; the multipliers; the Spearman correlation and its candidates; search and
importance FLOPs), ``DIR/table.md`` and ``DIR/curves.png``. A rerun with the same settings reuses the finished
steps; other settings need ``--overwrite`` (or another ``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_subnet.cache import cache_dir  # noqa: E402
from megatron_subnet.cli import ArgumentParser, positive_int, run_main  # noqa: E402
from megatron_subnet.outputs import write_text_atomically  # noqa: E402

TARGET_PARAMS = 0.5  # of the parent's total parameters
DATA_SEED = 1234  # the training --seed of every arm: one data order, one set of validation batches
SEARCH_DATA_SEED = 4321  # the search's selection batches: other samples of the valid split than the arms' evaluation
SPEARMAN_SEED = 99
SPLIT = "949,50,1"  # the tools' default --split


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one scale: the data, the budget, the searches and the proxy check."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    train_iters: int  # a multiple of 4: evaluations at 0, 25, 50, 75 and 100%
    eval_iters: int
    lr: float
    warmup_iters: int
    kd_alpha: float
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
    def tokens(self) -> int:
        return self.train_iters * self.global_batch_size * self.seq_length


SCALES = {
    # the plumbing on a tiny random parent: seconds
    "smoke": Scale(32, 2, 4, 8, 1, 1e-3, 1, 0.5, 1, 1, 4, 2, 1, 1, 1, 0.15, 8, 12, 2),
    # SmolLM2-135M on this 2-core CPU: about an hour
    "cpu": Scale(256, 4, 4, 24, 4, 3e-4, 2, 0.5, 4, 2, 8, 3, 2, 2, 2, 0.05, 64, 12, 6),
    # one H200, about 10 minutes (sized, not yet run)
    "gpu": Scale(1024, 8, 32, 200, 8, 6e-4, 20, 0.5, 16, 8, 16, 6, 2, 8, 8, 0.05, 64, 16, 20, bf16=True),
}

ARM_LABELS = {
    "random_init": "random init (CE)",
    "first_k_kd": "first-k + KD",
    "width_oneshot_kd": "Minitron width-only + KD",
    "depth_oneshot_kd": "depth-only + KD",
    "evolution_kd": "evolutionary search + KD",
    "random_search_kd": "random search + KD",
    "evolution_ce_tokens": "evolutionary search, CE, equal tokens",
    "evolution_ce_flops": "evolutionary search, CE, equal FLOPs",
}


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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="search seeds of arms 5 and 6")
    p.add_argument("--train-iters", type=positive_int, help="override the scale's budget (a multiple of 4)")
    p.add_argument("--overwrite", action="store_true", help="start anew in an --output of other settings")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"argument --seeds: repeated seed in {args.seeds}")
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
        from megatron_subnet.training.trainer import main
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
    return {"path": str(path), "flops": int(meta["flops"])}


def run_search(parent: Path, data: str, scale: Scale, importance: str, mode: str, seed: int, out: Path,
                device: str) -> dict:  # fmt: skip
    """One search (or one-shot) run; its summary with the FLOPs it spent."""
    directory = out / (mode if mode in ("first_k", "width_oneshot", "depth_oneshot") else f"{mode}_seed{seed}")
    if not (directory / "summary.json").exists():
        argv = [
            "--load", str(parent), "--data-path", data, "--seq-length", str(scale.seq_length),
            "--micro-batch-size", str(scale.micro_batch_size), "--fitness-batches", str(scale.fitness_batches),
            "--target-params", str(TARGET_PARAMS), "--tolerance", str(scale.tolerance), "--include-embeddings",
            "--grid", str(scale.grid), "--mode", mode, "--seed", str(seed), "--data-seed", str(SEARCH_DATA_SEED),
            "--rescore-top", "2",
            "--rescore-batches", str(scale.rescore_batches), "--device", device, "--output", str(directory),
            "--overwrite",  # an unfinished search here (no summary) restarts
        ]  # fmt: skip
        if mode != "first_k":
            argv += ["--importance", importance]
        if mode in ("evolution", "random"):
            argv += ["--space", "uniform", "--population", str(scale.population),
                     "--generations", str(scale.generations), "--elite", str(scale.elite)]  # fmt: skip
        call("tools/search_subnet.py", argv)
    summary = json.loads((directory / "summary.json").read_text())
    return {
        "mode": mode,
        "seed": seed,
        "subnet": str(directory / "best_subnet.json"),
        "evaluations": summary["evaluations"],
        "flops": int(summary["search_flops"]) + int(summary.get("rescore_flops") or 0),
        "selection_loss": summary["best"]["loss"],
        "heldout_loss": summary["best"].get("heldout_loss"),
        "total_params": summary["best"]["total_params"],
        "non_embedding_params": summary["best"]["non_embedding_params"],
    }


def train_arm(name: str, parent: Path, data: str, heldout: str, scale: Scale, subnet: str, init: str,
               kd: bool, iters: int, out: Path) -> list[dict]:  # fmt: skip
    """One training arm; its evaluations with tokens and training/teacher FLOPs."""
    log_dir = out / "arms" / name
    done = log_dir / "evaluations.json"
    if not done.exists():
        ds_config = out / "ds_config.json"
        config = {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0, "bf16": {"enabled": scale.bf16}}
        write_text_atomically(ds_config, json.dumps(config))
        argv = [
            "--ds_config", str(ds_config), "--parent-load", str(parent), "--subnet", subnet, "--init", init,
            "--data-path", data, "--extra-valid-data-path", heldout, "--seq-length", str(scale.seq_length),
            "--micro-batch-size", str(scale.micro_batch_size), "--global-batch-size", str(scale.global_batch_size),
            "--train-iters", str(iters), "--lr", str(scale.lr), "--min-lr", str(scale.lr / 10),
            "--lr-warmup-iters", str(scale.warmup_iters), "--seed", str(DATA_SEED),
            "--eval-interval", str(iters // 4), "--eval-iters", str(scale.eval_iters), "--log-interval", "1",
            "--log-dir", str(log_dir), "--overwrite",  # an unfinished arm (no evaluations.json) restarts
        ]  # fmt: skip
        argv += ["--teacher-load", str(parent), "--kd-alpha", str(scale.kd_alpha)] if kd else ["--kd-alpha", "0"]
        argv += ["--bf16"] if scale.bf16 else []
        call("pretrain_slm.py", argv)
        write_text_atomically(done, json.dumps(read_evaluations(log_dir / "metrics.jsonl"), indent=1))
    return json.loads(done.read_text())


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
                        load_importance(importance, None, model.config))  # fmt: skip
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
    trained = SubnetFitness(model, heldout, batches["train"],
                            FitnessConfig(train_steps=scale.spearman_train_steps, lr=scale.lr, kd_alpha=scale.kd_alpha))
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
    result = {"rho": rho, "candidates": rows, "train_steps": scale.spearman_train_steps, "flops": flops,
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


def multipliers(arms: list[dict]) -> dict:
    """Tokens- and FLOPs-to-target of evolution_kd (mean over seeds) over random_init, both directions."""
    baseline = next(a for a in arms if a["name"] == "random_init")
    searched = [a for a in arms if a["name"] == "evolution_kd"]
    final = sum(a["evaluations"][-1]["valid_loss"] for a in searched) / len(searched)
    out = {"target_loss": final, "baseline": "random_init", "arm": "evolution_kd (mean over seeds)"}
    for axis in ("tokens", "flops"):
        used = sum(a["evaluations"][-1][axis] for a in searched) / len(searched)
        needed = reach(baseline["evaluations"], final, axis)
        budget = baseline["evaluations"][-1][axis]
        out[f"{axis}_to_target"] = {
            "searched_arm": used,
            "random_init": needed if needed is not None else budget,
            "multiplier": (needed if needed is not None else budget) / used,
            "lower_bound": needed is None,
        }
    # the paper's direction: how soon does the searched arm reach what random init ends at?
    baseline_final = baseline["evaluations"][-1]["valid_loss"]
    out["reverse"] = {"target_loss": baseline_final}
    for axis in ("tokens", "flops"):
        times = [reach(a["evaluations"], baseline_final, axis) for a in searched]
        out["reverse"][axis] = {
            "random_init": baseline["evaluations"][-1][axis],
            "searched_arm": None if None in times else sum(times) / len(times),
            "reached_at_initialisation": all(
                t is not None and t <= a["evaluations"][0][axis] for t, a in zip(times, searched)
            ),
        }
    return out


def arm_record(name: str, seed: int | None, search: str | None, init: str, kd: bool, offset: int,
               evaluations: list[dict], counts: dict) -> dict:  # fmt: skip
    """One arm of results.json; ``search``: its key in ``searches`` (None: no search paid for)."""
    points = [{**e, "flops": offset + e["train_flops"] + e["teacher_flops"]} for e in evaluations]
    return {"name": name, "label": ARM_LABELS[name], "seed": seed, "init": init, "kd": kd, "search": search,
            "search_and_importance_flops": offset, **counts, "evaluations": points}  # fmt: skip


def write_table(results: dict, path: Path) -> None:
    scale = results["scale"]
    lines = [
        f"Scale `{results['scale_name']}`: parent {results['parent']['total_params']:,} parameters "
        f"({results['parent']['non_embedding_params']:,} non-embedding); budget {TARGET_PARAMS:.0%} of its total "
        f"parameters; {scale['train_iters']} steps of {scale['global_batch_size']} x {scale['seq_length']} tokens "
        f"({results['tokens_budget']:,} tokens) per arm, one data order. Losses: validation split / held-out "
        "text, at 0 / 25 / 50 / 100% of the arm's steps.",
        "",
        "| arm | seed | total params | non-emb. params | tokens | FLOPs (incl. search) | valid loss 0 / 25 / 50 "
        "/ 100% | held-out text 0 / 25 / 50 / 100% |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for arm in results["arms"]:
        ev = arm["evaluations"]
        picks = [ev[0], ev[len(ev) // 4], ev[len(ev) // 2], ev[-1]] if len(ev) >= 5 else ev
        lines.append(
            f"| {arm['label']} | {'' if arm['seed'] is None else arm['seed']} | {arm['total_params']:,} | "
            f"{arm['non_embedding_params']:,} | {ev[-1]['tokens']:,} | {ev[-1]['flops']:.3g} | "
            + " / ".join(f"{p['valid_loss']:.3f}" for p in picks) + " | "
            + " / ".join(f"{p['heldout_loss']:.3f}" for p in picks) + " |"
        )  # fmt: skip
    m = results["multipliers"]
    lines += ["", f"Searched + KD (mean over seeds) ends at validation loss {m['target_loss']:.3f}."]
    for axis in ("tokens", "flops"):
        entry = m[f"{axis}_to_target"]
        bound = " (lower bound: random init does not reach it within its budget)" if entry["lower_bound"] else ""
        lines.append(f"- {axis} to that loss: random init {entry['random_init']:.3g} vs {entry['searched_arm']:.3g}"
                     f" -> **{entry['multiplier']:.2f}x**{bound}")  # fmt: skip
    r = m["reverse"]
    for axis in ("tokens", "flops"):
        when = r[axis]["searched_arm"]
        text = ("already at its initialisation" if r[axis]["reached_at_initialisation"]
                else "not within its budget" if when is None else f"after {when:.3g}")  # fmt: skip
        lines.append(f"- random init's final loss {r['target_loss']:.3f} ({r[axis]['random_init']:.3g} {axis}): "
                     f"searched + KD reaches it {text}")  # fmt: skip
    s = results["spearman"]
    lines += ["", f"Proxy check: Spearman rho = {s['rho']:.3f} between untrained fitness and the loss after "
              f"{s['train_steps']} distillation steps, over {len(s['candidates'])} random in-budget "
              "candidates."]  # fmt: skip
    write_text_atomically(path, "\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for arm in results["arms"]:
        ev = arm["evaluations"]
        label = arm["label"] + ("" if arm["seed"] is None else f", seed {arm['seed']}")
        style = "--" if not arm["kd"] else "-"
        axes[0].plot([e["tokens"] for e in ev], [e["valid_loss"] for e in ev], style, marker="o", ms=3, label=label)
        axes[1].plot([e["flops"] for e in ev], [e["valid_loss"] for e in ev], style, marker="o", ms=3)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("FLOPs (training + teacher forwards + search and importance)")
    axes[0].set_ylabel("validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"initialisation arms at {TARGET_PARAMS:.0%} of the parent's parameters ({results['scale_name']}); "
                 "dashed: no distillation")  # fmt: skip
    fig.tight_layout(rect=(0, 0.13, 1, 1))
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


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    start = time.time()
    scale = SCALES[args.scale]
    if args.train_iters is not None:
        if args.train_iters % 4:
            raise ExperimentError(f"--train-iters {args.train_iters}: must be a multiple of 4")
        scale = dataclasses.replace(scale, train_iters=args.train_iters)
    out = Path(args.output)
    settings = {"scale": args.scale, "sizes": dataclasses.asdict(scale), "seeds": args.seeds,
                "parent": args.parent, "data_path": args.data_path, "extra_valid_data_path": args.extra_valid_data_path,
                "heldout_source": args.heldout_source}  # fmt: skip
    check_output_dir(out, settings, args.overwrite)
    import torch

    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config

    device = "cuda" if args.scale == "gpu" and torch.cuda.is_available() else "cpu"
    parent, data, heldout = prepare_inputs(args, out)
    parent_config = load_config(parent)
    search_dir = out / "search"
    importance = run_importance(parent, data, scale, out, device)
    searches = {}
    for mode in ("first_k", "width_oneshot", "depth_oneshot"):
        searches[mode] = run_search(parent, data, scale, importance["path"], mode, 0, search_dir, device)
    for seed in args.seeds:
        for mode in ("evolution", "random"):
            searches[f"{mode}{seed}"] = run_search(parent, data, scale, importance["path"], mode, seed, search_dir,
                                                    device)  # fmt: skip

    def counts(subnet_path: str) -> dict:
        config = SubnetConfig.load(subnet_path, parent_config).student_config(parent_config)
        return {"total_params": config.num_parameters(), "non_embedding_params": config.num_parameters(False)}

    def cost(search: dict) -> int:
        return search["flops"] + (importance["flops"] if search["mode"] != "first_k" else 0)

    tokens_budget, arms = scale.tokens, []
    best_key = f"evolution{args.seeds[0]}"

    def arm(name: str, directory: str, seed: int | None, search_key: str, kd: bool, init: str = "subnet",
            iters: int = scale.train_iters, charged: bool = True) -> dict:  # fmt: skip
        """Train one arm from ``search_key``'s sub-network (its shape only with init random) and record it."""
        search = searches[search_key]
        evaluations = train_arm(directory, parent, data, heldout, scale, search["subnet"], init, kd, iters, out)
        record = arm_record(name, seed, search_key if charged else None, init, kd, cost(search) if charged else 0,
                            evaluations, counts(search["subnet"]))  # fmt: skip
        arms.append(record)
        return record

    arm("random_init", "random_init", None, best_key, False, init="random", charged=False)
    for mode in ("first_k", "width_oneshot", "depth_oneshot"):
        arm(f"{mode}_kd", f"{mode}_kd", None, mode, True)
    for seed in args.seeds:
        for mode, name in (("evolution", "evolution_kd"), ("random", "random_search_kd")):
            arm(name, f"{name}_seed{seed}", seed, f"{mode}{seed}", True)
    kd_last = next(a for a in arms if a["name"] == "evolution_kd" and a["seed"] == args.seeds[0])["evaluations"][-1]
    arm("evolution_ce_tokens", "evolution_ce_tokens", args.seeds[0], best_key, False)
    # as many CE steps as cost the KD arm's student and teacher FLOPs (a multiple of 4, for the evaluations)
    per_step = kd_last["train_flops"] / scale.train_iters
    equal_flops_iters = 4 * max(1, round((kd_last["train_flops"] + kd_last["teacher_flops"]) / per_step / 4))
    arm("evolution_ce_flops", "evolution_ce_flops", args.seeds[0], best_key, False, iters=equal_flops_iters)
    proxy = proxy_check(parent, data, scale, importance["path"], out, device)
    results = {
        "scale_name": args.scale,
        "scale": dataclasses.asdict(scale),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": args.seeds,
        "data_seed": DATA_SEED,
        "target_params": f"{TARGET_PARAMS} of the parent's total parameters",
        "parent": {"path": str(parent), "total_params": parent_config.num_parameters(),
                   "non_embedding_params": parent_config.num_parameters(False)},  # fmt: skip
        "data": {"train": data, "heldout_text": heldout},
        "tokens_budget": tokens_budget,
        "importance_flops": importance["flops"],
        "searches": searches,
        "arms": arms,
        "multipliers": multipliers(arms),
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
