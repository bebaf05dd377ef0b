"""Perplexity of the teacher (ours vs transformers) and of untrained ~50% sub-networks cut from it.

    python benchmarks/subnet_init_perplexity.py [--teacher-hf DIR] [--teacher runs/teacher] \\
        [--data-path data/demo_text_document] [--seq-length 512] [--micro-batch-size 4] [--eval-iters 16] \\
        [--calib-iters 8] [--drop-loss-iters 1] [--target 0.5] [--output runs/subnet_init_perplexity.json]

Steps (each skipped when its output exists): import the HF teacher into our checkpoint format, tokenize
the demo corpus, compute importance on train batches (``--importance``, cached). Then, on the same
held-out (valid) batches:

(i)   the teacher, ours and transformers' AutoModelForCausalLM (the same number, to float tolerance);
(ii)  sub-networks at ~``--target`` of the teacher's non-embedding parameters, untrained:
      (a) first-k, a uniform shrink: layers, hidden size and MLP width scaled by one factor r (hidden and
          MLP to multiples of 32), every query group kept with round(r * heads per group) heads; r is
          chosen so the count lands closest to the target;
      (b) the same counts, with every index chosen by importance (layers by the block metric);
      (c) layer dropping only: all widths kept, the lowest-importance layers dropped (block importance and
          drop-loss importance).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_subnet.cache import cache_dir  # noqa: E402
from megatron_subnet.data.batches import load_batches  # noqa: E402
from megatron_subnet.data.indexed import dataset_exists  # noqa: E402
from megatron_subnet.model.config import ModelConfig  # noqa: E402
from megatron_subnet.model.evaluation import (  # noqa: E402
    evaluate,
    load_any,
    load_transformers,
    transformers_forward,
)
from megatron_subnet.model.importance import compute_importance, load_importance  # noqa: E402
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-hf", default=str(cache_dir() / "smollm2-135m-instruct"), help="HF teacher directory")
    p.add_argument("--teacher", default=str(ROOT / "runs" / "teacher"), help="our checkpoint (imported if missing)")
    p.add_argument("--corpus", default=str(cache_dir() / "demo_corpus" / "corpus.jsonl"))
    p.add_argument("--data-path", default=str(ROOT / "data" / "demo_text_document"),
                   help="tokenized corpus prefix (tokenized from --corpus if missing)")
    p.add_argument("--split", default="949,50,1")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--eval-iters", type=int, default=16)
    p.add_argument("--calib-iters", type=int, default=8)
    p.add_argument("--drop-loss-iters", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--target", type=float, default=0.5, help="fraction of non-embedding parameters to keep")
    p.add_argument("--importance", default=str(ROOT / "runs" / "teacher_importance.safetensors"))
    p.add_argument("--output", default=str(ROOT / "runs" / "subnet_init_perplexity.json"))
    return p.parse_args()


def prepare(args: argparse.Namespace) -> None:
    """Import the teacher and tokenize the corpus unless already done."""
    if not (Path(args.teacher) / "model_config.json").is_file():
        from megatron_subnet.model.hf import load_hf
        from megatron_subnet.model.weights import save_checkpoint

        print(f"importing {args.teacher_hf} -> {args.teacher}", flush=True)
        config, state = load_hf(args.teacher_hf)
        save_checkpoint(args.teacher, config, state, tokenizer_from=args.teacher_hf)
    if not dataset_exists(args.data_path):
        suffix = "_text_document"
        if not args.data_path.endswith(suffix):
            sys.exit(f"error: {args.data_path} does not exist and does not end with {suffix}")
        print(f"tokenizing {args.corpus} -> {args.data_path}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", args.corpus,
                        "--output-prefix", args.data_path[: -len(suffix)], "--tokenizer-type",
                        "HuggingFaceTokenizer", "--tokenizer-model", args.teacher_hf, "--workers", "2",
                        "--append-eod"], check=True)


def uniform_shrink(parent: ModelConfig, target: float) -> tuple[float, dict]:
    """Counts of recipe (a): the shrink factor r whose parameter count is closest to ``target``."""
    full = parent.num_parameters(include_embeddings=False)
    best = None
    for r in np.linspace(0.3, 1.0, 701):
        groups, per_group = parent.layer_query_groups(0), parent.layer_heads(0) // parent.layer_query_groups(0)
        counts = dict(
            num_layers=max(1, round(r * parent.num_layers)),
            hidden_size=max(32, 32 * round(r * parent.hidden_size / 32)),
            num_query_groups=groups,
            num_attention_heads=groups * max(1, round(r * per_group)),
            ffn_hidden_size=max(32, 32 * round(r * parent.layer_ffn(0) / 32)),
        )
        frac = SubnetConfig.from_counts(parent, **counts).num_parameters(parent, False) / full
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (float(r), frac, counts)
    return best[0], best[2]


def layer_drop_count(parent: ModelConfig, target: float) -> int:
    full = parent.num_parameters(include_embeddings=False)
    return min(range(1, parent.num_layers + 1), key=lambda k: abs(
        SubnetConfig.from_counts(parent, num_layers=k).num_parameters(parent, False) / full - target))


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    prepare(args)
    batch_args = (args.data_path, args.split)
    eval_batches = load_batches(*batch_args, "valid", args.seq_length, args.micro_batch_size, args.eval_iters,
                                args.seed)
    model = load_any(args.teacher)
    parent = model.config
    full = parent.num_parameters(include_embeddings=False)
    rows, timings = [], {}

    def record(name: str, forward, params: int | None, desc: str) -> None:
        start = time.time()
        result = evaluate(forward, eval_batches, desc=desc)
        timings[name] = time.time() - start
        rows.append(dict(name=name, non_embedding_params=params, fraction=params / full if params else None,
                         loss=result.loss, perplexity=result.perplexity, tokens=result.tokens,
                         seconds=round(timings[name], 1)))
        print(f"{name}: loss {result.loss:.4f} ppl {result.perplexity:.2f} ({timings[name]:.0f} s)", flush=True)

    record("teacher (ours)", lambda t: model(t), full, "teacher ours")
    hf = load_transformers(args.teacher_hf)
    record("teacher (transformers)", transformers_forward(hf), full, "teacher transformers")
    del hf

    if Path(args.importance).is_file():
        importance = load_importance(args.importance, "block", parent)
        print(f"importance: loaded {args.importance} ({importance.metadata.get('num_tokens')} tokens)")
    else:
        calib = load_batches(*batch_args, "train", args.seq_length, args.micro_batch_size, args.calib_iters,
                             args.seed)
        start = time.time()
        importance = compute_importance(model, calib, args.drop_loss_iters, "block")
        timings["importance"] = time.time() - start
        importance.save(args.importance)
        print(f"importance: {timings['importance']:.0f} s -> {args.importance}", flush=True)

    r, counts = uniform_shrink(parent, args.target)
    k = layer_drop_count(parent, args.target)
    subnets = {
        "(a) first-k uniform shrink": SubnetConfig.from_counts(parent, **counts),
        "(b) same counts, importance order": SubnetConfig.from_counts(parent, **counts, importance=importance),
        "(c) drop layers, block importance": SubnetConfig.from_counts(parent, num_layers=k, importance=importance),
    }
    if importance.drop_loss is not None:
        subnets["(c) drop layers, drop-loss importance"] = SubnetConfig.from_counts(
            parent, num_layers=k, importance=importance.with_layer_metric("drop_loss"))
    for name, subnet in subnets.items():
        index = subnet_indices(parent, subnet)
        record(name, lambda t, index=index: model(t, subnet=index), subnet.num_parameters(parent, False), name[:3])

    diff = rows[0]["loss"] - rows[1]["loss"]
    print(f"\nteacher loss, ours - transformers: {diff:.2e} (ours {rows[0]['loss']:.6f}, "
          f"transformers {rows[1]['loss']:.6f})")
    print(f"recipe (a): r = {r:.3f} -> {counts}; (c): keep {k} of {parent.num_layers} layers")
    print(f"(c) block keeps {subnets['(c) drop layers, block importance'].layers}")
    if "(c) drop layers, drop-loss importance" in subnets:
        print(f"(c) drop-loss keeps {subnets['(c) drop layers, drop-loss importance'].layers}")
    meta = importance.metadata
    print(f"eval: {rows[0]['tokens']} valid tokens ({len(eval_batches)} x {args.micro_batch_size} x "
          f"{args.seq_length}); calibration: {meta.get('num_tokens')} train tokens, drop loss on "
          f"{meta.get('drop_loss_tokens')}")
    print("\n| sub-network | non-emb. params | fraction | loss | perplexity |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['non_embedding_params'] / 1e6:.2f} M | {row['fraction']:.3f} | "
              f"{row['loss']:.5f} | {row['perplexity']:.2f} |")
    print(f"\ntotal {time.time() - t0:.0f} s")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({
        "args": vars(args), "recipe_a": {"r": r, **counts}, "layer_drop_keep": k, "rows": rows,
        "subnets": {name: s.to_dict() for name, s in subnets.items()}, "timings_s": timings,
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
