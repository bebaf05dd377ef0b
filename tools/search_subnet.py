"""Evolutionary (or random) search for the best sub-network of a parent checkpoint under a parameter budget.

    python tools/search_subnet.py --load ckpt/teacher --data-path data/corpus_text_document \\
        [--split 949,50,1] [--seq-length 256] [--micro-batch-size 4] [--fitness-batches 4] \\
        [--space uniform|per_layer|index] [--importance importance.safetensors] [--grid 8] \\
        (--target-params 0.5 [--tolerance 0.05] | --bins 5 --min-params 0.3 --max-params 0.7) \\
        [--population 16] [--generations 10] [--mutation-prob 0.2] [--crossover-prob 0.5] \\
        [--tournament-size 3] [--elite 2] [--mode evolution|random] [--seed 0] \\
        [--fitness-train-steps 0] [--rescore-top 5] [--rescore-batches N] --output search/
    python tools/search_subnet.py --mode width_oneshot|depth_oneshot|first_k --target-params 0.5 ...
                                                   # one-shot baselines: one candidate, one evaluation

    torchrun --nproc-per-node 4 tools/search_subnet.py ...   # candidates evaluated 4 at a time, same result
    torchrun --nproc-per-node 4 tools/search_subnet.py --tensor-model-parallel-size 2 ...
                                                   # 2 replicas of a parent split over 2 ranks each, same result
    torchrun --nproc-per-node 4 tools/search_subnet.py --pipeline-model-parallel-size 2 ...
                                                   # 2 replicas of a parent in 2 pipeline stages, same result

Fitness is the validation loss of the masked sub-network on ``--fitness-batches`` fixed batches of the
valid split (``--data-seed`` picks them), optionally after ``--fitness-train-steps`` of distillation.
Parameter budgets count non-embedding parameters (``--include-embeddings``: total); values up to 1 are
fractions of the parent, larger ones absolute counts; ``--tolerance`` is relative to the target.
Writes ``results.jsonl``, ``best_subnet.json`` (for ``pretrain_slm.py --subnet``), ``best_per_bin.json``,
``summary.json``, ``rescored.json``, ``pareto.png`` and ``state.json``; running the same command again resumes
a killed search (only ``--generations`` may change, to extend it; the importance file is compared by content).

Accounting: every results.jsonl row, best_per_bin.json entry, summary.json and printed line carries both
``total_params`` and ``non_embedding_params`` (``params`` is the budget's metric), and the FLOPs spent:
each row's ``flops`` (the candidate's student forward FLOPs x the validation tokens; with
``--fitness-train-steps`` also its training FLOPs and the parent's forwards on the KD batches when they run,
their logits being cached), ``search_flops`` (cumulative, kept in state.json across resumes) in
summary.json and the last line, and ``rescore_flops`` for the re-scoring.

Held-out re-scoring: at the end each bin's ``--rescore-top K`` best candidates (default 5, 0: none) are scored
again, the same way, on ``--rescore-batches`` batches (default ``--fitness-batches``) that the selection never
saw: the test split's (``--data-seed``), or, when the test split has no documents, the valid split's samples
that follow the selection's in its shuffled order (other samples of the same epoch; refused when one epoch of
the valid split cannot hold both, or it is a blend). ``rescored.json`` and the printed summary give both losses, the
split and the number of samples and tokens; a killed re-scoring resumes with what it had not scored.
``--select-by heldout`` (the default) then picks each bin's winner, the one written to ``best_subnet.json``, by
its held-out loss among those K: the search's own loss, on the samples it ranked thousands of candidates by,
is biased towards whoever fit those samples best. ``--select-by selection`` keeps the search's pick. A
candidate costs ``--fitness-batches`` x ``--micro-batch-size`` x ``--seq-length`` tokens of forward passes
(4 x 4 x 256 by default); more batches rank more reliably at a proportional cost.

Seeding: ``--mode evolution`` opens generation 0 with the one-shot shapes below (first-k, width-only,
depth-only) sized into each bin, in place of as many random samples (``--no-seed-oneshot``: all random;
the index space has no seeds); results.jsonl marks them ``seeded_from``.

One-shot baselines (``--mode``, one evaluation, no evolution; megatron_subnet/search/oneshot.py):
``width_oneshot`` (Minitron width-only: all layers, full hidden, query groups with their heads and MLP
neurons pruned by importance; needs ``--importance``), ``depth_oneshot`` (whole layers dropped by the
drop-loss layer scores, or ``--layer-metric``'s; full width; needs ``--importance`` with layer scores) and
``first_k`` (every dimension's first units, one fraction for all; no importance). Each sizes its shape
into ``--target-params`` +- ``--tolerance`` (one ``error:`` line naming the mode and the budget when no such
shape fits) and writes the same outputs as a search (one results.jsonl row); ``--space``, ``--bins`` and
the evolution flags do not apply.

``--output`` may not hold search results without their ``state.json`` (``--overwrite`` starts a new search
there instead), nor contain or lie inside an input. A search in which no candidate gets a finite loss exits non-zero.

``--tensor-model-parallel-size N`` (under torchrun, N x D processes): each rank loads only its shard of
the parent (``--load`` consolidated or saved at any TP size), the N ranks of a data-parallel replica
evaluate the same candidates together, the D replicas split them; results equal a single process's.
``--divisible-by N`` keeps every candidate's query groups (so heads) and MLP width multiples of N: pass
it when the student will be trained at tensor-parallel size N (the searching TP size does not matter
for masked fitness). ``--fitness-train-steps`` at TP > 1 cuts each student shard from ``--load``'s file
(only its bytes) and needs ``--divisible-by`` a multiple of N, since the student is trained sharded.
Global rank 0 writes the outputs.

``--pipeline-model-parallel-size P`` (under torchrun, world = TP x PP x DP): the parent's layers are split
evenly over P stages, each rank loads only its (TP shard, stage) of ``--load`` (consolidated or any TP x
PP layout), a candidate's validation forward runs through the stages (forward-only schedule) and the D
data-parallel replicas split the candidates; results equal a single process's. ``--fitness-train-steps``
at P > 1 splits each student's kept layers evenly over the stages (so ``--min-layers`` >= P), cuts every
stage's shard from ``--load``'s file and trains it through the stages beside the parent's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_subnet.cli import (  # noqa: E402
    ArgumentParser,
    finite_float,
    fraction,
    nonnegative_int,
    positive_int,
    resolve_device,
    run_main,
)
from megatron_subnet.data.batches import check_vocab, load_batches  # noqa: E402
from megatron_subnet.data.gpt_dataset import DATA_ORDER  # noqa: E402
from megatron_subnet.model.weights import CheckpointError, CheckpointReader, load_config  # noqa: E402
from megatron_subnet.outputs import OutputError, check_not_nested, check_writable_location  # noqa: E402
from megatron_subnet.search.evolution import (  # noqa: E402
    MODES,
    ONESHOT_MODES,
    OUTPUT_NAMES,
    SELECT_BY,
    STATE_NAME,
    EvolutionConfig,
    Search,
)
from megatron_subnet.search.fitness import (  # noqa: E402
    FitnessConfig,
    SubnetFitness,
    load_heldout_batches,
    load_parent,
)
from megatron_subnet.search.oneshot import oneshot_genome, seed_genomes  # noqa: E402
from megatron_subnet.search.space import SPACES, SearchSpace, SpaceConfig, check_budget, make_budget  # noqa: E402
from tools.evaluate import add_parallel_args, check_data_inputs, start_model_parallel  # noqa: E402


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("parent and data")
    g.add_argument("--load", required=True, help="the parent: our checkpoint directory")
    g.add_argument("--data-path", nargs="+", required=True, help="dataset prefix, or 'weight prefix' pairs")
    g.add_argument("--split", default="949,50,1", help="train,valid,test proportions of the documents")
    g.add_argument("--seq-length", type=positive_int, default=256)
    g.add_argument("--micro-batch-size", type=positive_int, default=4)
    g.add_argument("--fitness-batches", type=positive_int, default=4,
                   help="validation batches every candidate is scored on")
    g.add_argument("--data-seed", type=nonnegative_int, default=1234,
                   help="seed of the sample shuffle (fixes the batches)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_parallel_args(g)
    g = p.add_argument_group("search space")
    g.add_argument("--space", choices=SPACES, default=None, help="default: uniform (one-shot modes: their own)")
    g.add_argument("--importance", help="importance scores (.safetensors, tools/compute_importance.py)")
    g.add_argument("--layer-metric", choices=("block", "drop_loss"), help="layer score to order by (default: file's)")
    g.add_argument("--grid", type=positive_int, default=8, help="hidden and MLP sizes are multiples of this")
    g.add_argument("--divisible-by", type=positive_int, default=1,
                   help="query groups (so heads) and MLP sizes are multiples of this: pass N for a student trained "
                   "at --tensor-model-parallel-size N")
    g.add_argument("--min-layers", type=positive_int, default=1)
    g.add_argument("--max-layers", type=positive_int, default=None, help="default: the parent's")
    g.add_argument(
        "--hidden-divisible-by-heads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep hidden a multiple of every kept layer's head count (default: on for llama, which "
        "transformers' LlamaConfig needs for export)",
    )
    g.add_argument("--include-embeddings", action="store_true", help="budget on total, not non-embedding, params")
    g = p.add_argument_group("budget: a target, or bins")
    g.add_argument("--target-params", type=finite_float, help="fraction of the parent (<= 1) or absolute count")
    g.add_argument("--tolerance", type=finite_float, default=0.05, help="relative to --target-params")
    g.add_argument("--bins", type=positive_int,
                   help="equal parameter bins over [--min-params, --max-params], best per bin")
    g.add_argument("--min-params", type=finite_float)
    g.add_argument("--max-params", type=finite_float)
    g = p.add_argument_group("search")
    g.add_argument("--mode", choices=MODES, default="evolution")
    g.add_argument("--population", type=positive_int, default=16)
    g.add_argument("--generations", type=positive_int, default=10)
    g.add_argument("--mutation-prob", type=fraction, default=0.2, help="per gene")
    g.add_argument("--crossover-prob", type=fraction, default=0.5)
    g.add_argument("--tournament-size", type=positive_int, default=3)
    g.add_argument("--elite", type=nonnegative_int, default=2, help="best candidates kept per bin each generation")
    g.add_argument("--max-tries", type=positive_int, default=100, help="tries to make a new in-budget candidate")
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument("--seed-oneshot", action=argparse.BooleanOptionalAction, default=None,
                   help="open generation 0 with the one-shot shapes (first-k, width-only, depth-only) sized into "
                   "each bin (default: on for --mode evolution, off for random)")
    g.add_argument("--output", required=True, help="directory for results, best sub-network(s), plot and state")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new search in --output, replacing the search results (and state) there")
    g = p.add_argument_group("short distillation before scoring (optional)")
    g.add_argument("--fitness-train-steps", type=nonnegative_int, default=0,
                   help="AdamW steps of distillation per candidate")
    g.add_argument("--fitness-lr", type=nonnegative_float, default=1e-4)
    g.add_argument("--fitness-kd-alpha", type=fraction, default=0.5)
    g = p.add_argument_group("held-out re-scoring")
    g.add_argument("--rescore-top", type=nonnegative_int, default=5,
                   help="re-score each bin's K best candidates on held-out samples at the end (0: none)")
    g.add_argument("--rescore-batches", type=positive_int, default=None,
                   help="held-out batches each re-scored candidate is scored on (default: --fitness-batches)")
    g.add_argument("--select-by", choices=SELECT_BY, default=None,
                   help="pick each bin's winner by its held-out loss among the re-scored (the default), or by the "
                   "loss the search ranked on (the default with --rescore-top 0)")
    args = p.parse_args(argv)
    if args.select_by is None:
        args.select_by = "heldout" if args.rescore_top else "selection"
    if args.select_by == "heldout" and not args.rescore_top:
        p.error("--rescore-top 0: --select-by heldout picks the winner among the re-scored candidates; give "
                "--rescore-top >= 1, or --select-by selection")
    if args.seed_oneshot and args.mode in ONESHOT_MODES:
        p.error(f"--seed-oneshot: --mode {args.mode} evaluates its own one shape")
    if args.seed_oneshot is None:
        args.seed_oneshot = args.mode == "evolution"
    if args.rescore_batches is None:
        args.rescore_batches = args.fitness_batches
    if args.layer_metric and not args.importance:
        p.error("--layer-metric orders by importance scores: give --importance")
    if args.mode in ONESHOT_MODES:
        if args.space is not None:
            p.error(f"--space: --mode {args.mode} is a one-shot baseline with its own shape; leave --space out")
        if args.bins is not None:
            p.error(f"--bins: --mode {args.mode} fits one target; give --target-params (and --tolerance)")
        if args.mode in ("width_oneshot", "depth_oneshot") and not args.importance:
            what = "query groups and MLP neurons" if args.mode == "width_oneshot" else "layers"
            p.error(f"--mode {args.mode} prunes {what} by importance: give --importance "
                    "(tools/compute_importance.py)")
        if args.mode == "first_k" and args.importance:
            p.error("--importance: --mode first_k keeps the first units of every dimension; it uses no scores")
    args.space = args.space or "uniform"
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.fitness_train_steps and tp > 1 and args.divisible_by % tp:
        p.error(f"--fitness-train-steps at --tensor-model-parallel-size {tp} trains each student split over {tp} "
                f"ranks: pass --divisible-by a multiple of {tp} (got {args.divisible_by})")
    if args.fitness_train_steps and args.min_layers < pp:
        p.error(f"--fitness-train-steps at --pipeline-model-parallel-size {pp} trains each student split over {pp} "
                f"stages: pass --min-layers {pp} or more (got {args.min_layers})")
    return args


def check_search_output(args: argparse.Namespace, data_files: list[str]) -> None:
    """``--output``: a directory we may write, nested in no input, whose search results come with their state."""
    out = Path(args.output)
    check_writable_location(out, "--output", "dir")
    check_not_nested(out, "--output", {"--load": args.load, "--importance": args.importance})
    for path in data_files:
        check_not_nested(out, "--output", {"--data-path": path})
    if out.is_dir() and not args.overwrite and not (out / STATE_NAME).exists():
        found = [name for name in OUTPUT_NAMES if (out / name).exists()]
        if found:
            raise OutputError(
                f"--output {out}: holds search results ({', '.join(found)}) but no {STATE_NAME} to resume from "
                "(pass --overwrite to replace them)"
            )


def file_sha256(path: str, flag: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    return digest.hexdigest()


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    start = time.time()
    # everything that can be checked before loading the data or the parent's weights
    device = resolve_device(args.device)
    data_files = check_data_inputs(args.data_path, args.split)
    check_search_output(args, data_files)
    try:
        parent_config = load_config(args.load)
    except CheckpointError as e:
        hint = ""
        if os.path.isfile(os.path.join(args.load, "config.json")):
            hint = " (a Hugging Face directory: import it with tools/convert_checkpoint.py import)"
        raise ValueError(f"--load: {e}{hint}") from None
    parent_config.check_seq_length(args.seq_length)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    device = start_model_parallel(args.load, parent_config, tp, device, pp)
    importance = importance_sha256 = None
    oneshot = args.mode in ONESHOT_MODES
    layer_metric = args.layer_metric
    if args.mode == "depth_oneshot" and layer_metric is None:
        layer_metric = "drop_loss"  # the depth baseline drops the layers whose removal costs the least loss
    if args.importance:
        from megatron_subnet.model.importance import load_importance

        try:
            importance = load_importance(args.importance, layer_metric, parent_config)
        except ValueError as e:
            hint = ""
            if args.mode == "depth_oneshot" and "drop-loss" in str(e):
                hint = (" (--mode depth_oneshot orders layers by drop loss: compute it with "
                        "tools/compute_importance.py --drop-loss-iters N > 0, or pass --layer-metric block)")
            raise ValueError(f"--importance: {e}{hint}") from None
        importance_sha256 = file_sha256(args.importance, "--importance")
    space = SearchSpace(
        parent_config,
        SpaceConfig(
            kind="per_layer" if oneshot else args.space,
            grid=args.grid,
            divisible_by=args.divisible_by,
            min_layers=args.min_layers,
            max_layers=args.max_layers,
            hidden_divisible_by_heads=args.hidden_divisible_by_heads,
            include_embeddings=args.include_embeddings,
        ),
        importance,
    )
    budget = make_budget(
        space.parent_params(), args.target_params, args.tolerance, args.bins, args.min_params, args.max_params
    )
    fixed = None
    if oneshot:  # one candidate, sized before the data or the weights are read
        fixed = [oneshot_genome(space, args.mode, budget)]
        evolution = EvolutionConfig(population=1, generations=1, elite=0, mode=args.mode)
    else:
        evolution = EvolutionConfig(
            population=args.population,
            generations=args.generations,
            mutation_prob=args.mutation_prob,
            crossover_prob=args.crossover_prob,
            tournament_size=args.tournament_size,
            elite=args.elite,
            mode=args.mode,
            seed=args.seed,
            max_tries=args.max_tries,
        )
        evolution.validate(budget.bins)
        check_budget(space, budget)
    settings = {
        "load": os.path.abspath(args.load),
        "importance_sha256": importance_sha256,  # the file's content: a moved copy resumes, a changed file not
        "layer_metric": layer_metric,
        "data": [
            args.data_path,
            args.split,
            args.seq_length,
            args.micro_batch_size,
            args.fitness_batches,
            args.data_seed,
        ],
        "fitness": [args.fitness_train_steps, args.fitness_lr, args.fitness_kd_alpha],
        "rescore": [args.rescore_top, args.rescore_batches if args.rescore_top else None],
        "seed_oneshot": args.seed_oneshot,
        "data_order": DATA_ORDER,  # a search of another sample order scored other batches: not resumed
    }
    # a saved state of another search is refused here, before the data and the weights are read
    search = Search(
        space, budget, evolution, None, args.output, settings, restart=args.overwrite, fixed=fixed,
        rescore_top=args.rescore_top, select_by=args.select_by,
        seeds=seed_genomes(space, budget) if args.seed_oneshot else None,
    )
    data = (args.data_path, args.split)
    valid = load_batches(*data, "valid", args.seq_length, args.micro_batch_size, args.fitness_batches, args.data_seed)
    train = heldout = None
    if args.fitness_train_steps:
        train = load_batches(
            *data, "train", args.seq_length, args.micro_batch_size, args.fitness_train_steps, args.data_seed
        )
    if args.rescore_top:  # before the search: a split too small for held-out samples is found before the work
        heldout, heldout_info = load_heldout_batches(
            *data, args.seq_length, args.micro_batch_size, args.rescore_batches, args.data_seed,
            args.fitness_batches * args.micro_batch_size,
        )  # fmt: skip
        heldout_info["selection"] = {
            "split": "valid",
            "data_seed": args.data_seed,
            "samples": args.fitness_batches * args.micro_batch_size,
            "tokens": args.fitness_batches * args.micro_batch_size * args.seq_length,
        }
        heldout_info.update(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                            batches=args.rescore_batches)  # fmt: skip
    check_vocab(valid + (train or []) + (heldout or []), parent_config.vocab_size)
    reader = None
    try:
        parent = load_parent(args.load, device)
        if args.fitness_train_steps and tp * pp > 1:  # each rank cuts its student shards from the file
            reader = CheckpointReader(args.load)
    except CheckpointError as e:
        raise ValueError(f"--load: {e}") from None
    search.fitness = SubnetFitness(
        parent,
        valid,
        train,
        FitnessConfig(
            train_steps=args.fitness_train_steps,
            lr=args.fitness_lr,
            kd_alpha=args.fitness_kd_alpha,
        ),
        read=reader.read if reader is not None else None,
    )
    report = None
    try:
        search.run()
        if args.rescore_top:
            report = search.rescore(search.fitness.on_batches(heldout), heldout_info)
    finally:
        if reader is not None:
            reader.close()
    if search.writer:
        total = space.parent_params()
        metric = "total" if args.include_embeddings else "non-embedding"
        for entry in search.best_per_bin():
            if "loss" in entry:
                print(
                    f"bin {entry['bin']} [{entry['window'][0]:,}, {entry['window'][1]:,}]: loss "
                    f"{entry['loss']:.4f}, {_params(entry)} ({entry['params'] / total:.1%} of the parent's "
                    f"{metric}), {entry['config']}"
                )
        if report is not None:
            print(
                f"held-out re-scoring on the {report['split']} split ({report['samples']} samples, "
                f"{report['tokens']:,} tokens, data seed {report['data_seed']}; the selection used "
                f"{report['selection']['samples']} valid samples), {report['rescore_flops']:.3e} FLOPs:"
            )
            for row in report["candidates"]:
                print(
                    f"  bin {row['bin']} #{row['rank'] + 1}: selection loss {row['selection_loss']:.4f}, "
                    f"held-out loss {row['heldout_loss']:.4f}, {_params(row)}, key {row['key']}"
                )
        best = search.overall_winner()
        heldout_text = ""
        if best["key"] in search.rescored:
            heldout_text = f" (held-out {search.rescored[best['key']]['loss']:.4f})"
        print(
            f"best loss {best['loss']:.4f}{heldout_text}, picked by the {search.selected_by()} loss, "
            f"at {_params(search.summary()['best'])} -> "
            f"{args.output}/best_subnet.json ({search.evaluations} evaluations, {search.search_flops:.3e} "
            f"search FLOPs, {time.time() - start:.1f} s)"
        )
    return 0


def _params(entry: dict) -> str:
    return f"{entry['non_embedding_params']:,} non-embedding / {entry['total_params']:,} total params"


def main(argv: list[str] | None = None) -> int:
    """Errors are one ``error:`` line: exit 1 for bad inputs found at run time, 2 for bad flags."""
    return run_main(_main, argv, error_code=1)


if __name__ == "__main__":
    sys.exit(main())
