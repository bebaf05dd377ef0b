"""Evolutionary vs random sub-network search on the real parent (SmolLM2-135M), at equal fitness evaluations.

    python benchmarks/search_vs_random.py [--teacher runs/teacher] [--data-path data/demo_text_document] \\
        [--space uniform] [--target 0.5] [--tolerance 0.05] [--population 16] [--generations 10] \\
        [--seeds 0 1 2] [--seq-length 256] [--micro-batch-size 4] [--fitness-batches 4] \\
        [--output runs/search_vs_random]

Steps: import the HF teacher into our checkpoint format and tokenize the demo corpus unless done. Then,
with the parent loaded once and the same fixed validation batches for every candidate, run the search
in both modes for each seed (each run resumable in ``OUTPUT/{mode}_seed{s}``), and evaluate two
hand-picked references of the same size: the uniform shrink (layers, hidden, heads per group and MLP
scaled by one factor, closest to the target) with first-k indices, and with importance-order indices
(``--importance``, when the file exists). Prints a table (best validation loss per mode and seed, mean,
wall time, evaluations) and writes ``OUTPUT/summary.json`` and ``OUTPUT/pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_subnet.cache import cache_dir  # noqa: E402
from megatron_subnet.data.batches import check_vocab, load_batches  # noqa: E402
from megatron_subnet.data.indexed import dataset_exists  # noqa: E402
from megatron_subnet.model.subnet import SubnetConfig  # noqa: E402
from megatron_subnet.search.evolution import EvolutionConfig, Search, plot_pareto  # noqa: E402
from megatron_subnet.search.fitness import SubnetFitness, load_parent  # noqa: E402
from megatron_subnet.search.space import SPACES, SearchSpace, SpaceConfig, check_budget, make_budget  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-hf", default=str(cache_dir() / "smollm2-135m-instruct"))
    p.add_argument("--teacher", default=str(ROOT / "runs" / "teacher"), help="our checkpoint (imported if missing)")
    p.add_argument("--corpus", default=str(cache_dir() / "demo_corpus" / "corpus.jsonl"))
    p.add_argument("--data-path", default=str(ROOT / "data" / "demo_text_document"))
    p.add_argument("--split", default="949,50,1")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--fitness-batches", type=int, default=4)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument(
        "--importance",
        default=str(ROOT / "runs" / "teacher_importance.safetensors"),
        help="importance scores: order the space's indices and the importance reference (if present)",
    )
    p.add_argument("--space", choices=SPACES, default="uniform")
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--target", type=float, default=0.5, help="fraction of the parent's non-embedding parameters")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--elite", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=str(ROOT / "runs" / "search_vs_random"))
    return p.parse_args()


def prepare(args: argparse.Namespace) -> None:
    """Import the teacher and tokenize the demo corpus unless already done."""
    py = sys.executable
    if not (Path(args.teacher) / "model_config.json").is_file():
        subprocess.run(
            [
                py,
                str(ROOT / "tools" / "convert_checkpoint.py"),
                "import",
                "--input",
                args.teacher_hf,
                "--output",
                args.teacher,
            ],
            check=True,
        )
    if not dataset_exists(args.data_path):
        suffix = "_text_document"
        if not args.data_path.endswith(suffix):
            sys.exit(f"error: --data-path {args.data_path}: missing, and not a '*{suffix}' prefix to create")
        subprocess.run(
            [
                py,
                str(ROOT / "tools" / "preprocess_data.py"),
                "--input",
                args.corpus,
                "--output-prefix",
                args.data_path[: -len(suffix)],
                "--tokenizer-type",
                "HuggingFaceTokenizer",
                "--tokenizer-model",
                args.teacher_hf,
                "--workers",
                "2",
                "--append-eod",
            ],
            check=True,
        )


def uniform_shrink(space: SearchSpace, target: int) -> dict:
    """The uniform-space genome with layers, hidden, heads per group and MLP scaled by one factor r (all
    query groups kept), closest to ``target`` parameters."""
    full, best = space.full(), None
    for r in np.linspace(0.05, 1.0, 400):
        g = dict(
            full,
            layers=max(1, round(r * full["layers"])),
            hpg=max(1, round(r * full["hpg"])),
            ffn=max(space.grid, round(r * full["ffn"] / space.grid) * space.grid),
            hidden=max(space.grid, round(r * full["hidden"] / space.grid) * space.grid),
        )
        if space.fix_hidden(g) and (best is None or abs(space.params(g) - target) < best[0]):
            best = (abs(space.params(g) - target), g)
    return best[1]


def main() -> int:
    args = parse_args()
    prepare(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    parent = load_parent(args.teacher, device)
    config = parent.config
    importance = None
    if Path(args.importance).is_file():
        from megatron_subnet.model.importance import load_importance

        importance = load_importance(args.importance, None, config)
    valid = load_batches(
        args.data_path,
        args.split,
        "valid",
        args.seq_length,
        args.micro_batch_size,
        args.fitness_batches,
        args.data_seed,
    )
    check_vocab(valid, config.vocab_size)
    fitness = SubnetFitness(parent, valid)
    space = SearchSpace(config, SpaceConfig(kind=args.space, grid=args.grid), importance)
    budget = make_budget(space.parent_params(), args.target, args.tolerance)
    check_budget(space, budget)
    evolution_budget = EvolutionConfig(
        population=args.population, generations=args.generations, elite=args.elite
    ).total_evaluations(budget.bins)
    print(
        f"parent {args.teacher}: {space.parent_params():,} non-embedding params; window {budget.window(0)}; "
        f"{args.space} space, importance {'yes' if importance else 'no'}; {evolution_budget} evaluations per run "
        f"on {args.fitness_batches} x {args.micro_batch_size} x {args.seq_length} valid tokens; {device}",
        flush=True,
    )

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = {
        "load": str(Path(args.teacher).resolve()),
        "importance": args.importance if importance else None,
        "data": [
            args.data_path,
            args.split,
            args.seq_length,
            args.micro_batch_size,
            args.fitness_batches,
            args.data_seed,
        ],
    }
    runs, records = [], {"evolution": [], "random": []}
    for mode in ("evolution", "random"):
        for seed in args.seeds:
            config_ = EvolutionConfig(
                population=args.population, generations=args.generations, elite=args.elite, mode=mode, seed=seed
            )
            t = time.time()
            search = Search(space, budget, config_, fitness, output / f"{mode}_seed{seed}", settings)
            search.run()
            best = search.overall_best()
            runs.append(
                {
                    "mode": mode,
                    "seed": seed,
                    "loss": best["loss"],
                    "params": best["params"],
                    "evaluations": search.evaluations,
                    "seconds": time.time() - t,
                    "config": space.summary(best["genome"]),
                }
            )
            records[mode] += search.records
            print(
                f"{mode} seed {seed}: best loss {best['loss']:.4f} at {best['params']:,} params, "
                f"{search.evaluations} evaluations, {time.time() - t:.0f} s",
                flush=True,
            )

    shrink = uniform_shrink(
        SearchSpace(config, SpaceConfig(kind="uniform", grid=args.grid)), round(args.target * space.parent_params())
    )
    counts = dict(
        num_layers=shrink["layers"],
        hidden_size=shrink["hidden"],
        num_attention_heads=shrink["groups"] * shrink["hpg"],
        num_query_groups=shrink["groups"],
        ffn_hidden_size=shrink["ffn"],
    )
    references = {}
    orders = {"first-k": None, "importance": importance} if importance else {"first-k": None}
    for name, scores in orders.items():
        subnet = SubnetConfig.from_counts(config, **counts, importance=scores)
        ((loss, seconds),) = fitness([subnet])
        references[f"uniform shrink, {name}"] = (subnet.num_parameters(config, include_embeddings=False), loss)

    lines = ["| run | seed | best val loss | params (M) | evaluations | wall (s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['loss']:.4f} | {r['params'] / 1e6:.2f} | "
            f"{r['evaluations']} | {r['seconds']:.0f} |"
        )
    for mode in ("evolution", "random"):
        losses = [r["loss"] for r in runs if r["mode"] == mode]
        std = float(np.std(losses)) if len(losses) > 1 else math.nan
        lines.append(
            f"| **{mode} mean** | {len(losses)} seeds | {np.mean(losses):.4f} +- {std:.4f} | | "
            f"{sum(r['evaluations'] for r in runs if r['mode'] == mode)} | "
            f"{sum(r['seconds'] for r in runs if r['mode'] == mode):.0f} |"
        )
    for name, (params, loss) in references.items():
        lines.append(f"| {name} | - | {loss:.4f} | {params / 1e6:.2f} | 1 | |")
    print(f"\nreference counts: {counts}\n" + "\n".join(lines) + f"\n\ntotal {time.time() - start:.0f} s")
    plot_pareto(
        output / "pareto.png",
        records,
        references,
        title=f"{args.space} space, ~{args.target:.0%} of non-embedding params: evolution vs random",
    )
    summary = {
        "args": vars(args),
        "window": budget.window(0),
        "evaluations_per_run": evolution_budget,
        "runs": runs,
        "references": {k: {"params": p, "loss": v} for k, (p, v) in references.items()},
        "reference_counts": counts,
        "seconds": time.time() - start,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {output / 'summary.json'} and {output / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
