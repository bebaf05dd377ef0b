"""Loss and perplexity of a checkpoint, dense or as a masked sub-network, on one split of an indexed dataset.

    python tools/evaluate.py --load ckpt/teacher --data-path data/corpus_text_document \\
        [--split 949,50,1] [--split-name valid] [--seq-length 512] [--micro-batch-size 4] [--eval-iters 16] \\
        [--subnet SUBNET.json [--importance FILE]] [--hf] [--output results.jsonl]

``--load`` takes our checkpoint directory, a Hugging Face directory or a ``.gguf`` file. ``--hf`` runs
transformers' own model on the same batches instead of ours. Samples are Megatron's GPT samples
(``--seed`` shuffles them); the loss is the fp32 cross-entropy averaged over all label tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.data.batches import check_vocab, load_batches  # noqa: E402
from megatron_subnet.data.gpt_dataset import SPLIT_NAMES  # noqa: E402
from megatron_subnet.model.evaluation import evaluate, load_any, load_transformers, transformers_forward  # noqa: E402
from megatron_subnet.model.importance import LAYER_METRICS, load_importance  # noqa: E402
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices  # noqa: E402


def add_data_args(p: argparse.ArgumentParser, split_name: str, iters_flag: str, iters: int) -> None:
    """The data flags shared by evaluate.py and compute_importance.py."""
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True, help="dataset prefix, or 'weight prefix' pairs")
    g.add_argument("--split", default="949,50,1", help="train,valid,test proportions of the documents")
    g.add_argument("--split-name", default=split_name, choices=SPLIT_NAMES, help="which split to read")
    g.add_argument("--seq-length", type=int, default=512, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per batch")
    g.add_argument(iters_flag, type=int, default=iters, help="number of batches")
    g.add_argument("--seed", type=int, default=1234, help="seed of the sample shuffle")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def check_data_args(p: argparse.ArgumentParser, args: argparse.Namespace, iters: int) -> None:
    for name, value in (("--seq-length", args.seq_length), ("--micro-batch-size", args.micro_batch_size)):
        if value < 1:
            p.error(f"{name} {value}: must be at least 1")
    if iters < 1:
        p.error(f"number of batches {iters}: must be at least 1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="our checkpoint dir, a Hugging Face dir or a .gguf file")
    g.add_argument("--subnet", help="sub-network JSON (explicit indices or counts) run masked on the checkpoint")
    g.add_argument("--importance", help="importance scores (.safetensors) for a sub-network with order 'importance'")
    g.add_argument("--layer-metric", choices=LAYER_METRICS, help="layer score to order by (default: the file's)")
    g.add_argument("--hf", action="store_true", help="run transformers' AutoModelForCausalLM instead of ours")
    add_data_args(p, "valid", "--eval-iters", 16)
    p.add_argument("--output", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    check_data_args(p, args, args.eval_iters)
    if args.hf and args.subnet:
        p.error("--hf runs transformers' dense model; it does not take --subnet")
    if args.importance and not args.subnet:
        p.error("--importance only orders a --subnet")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        batches = load_batches(args.data_path, args.split, args.split_name, args.seq_length, args.micro_batch_size,
                               args.eval_iters, args.seed)
        subnet = None
        if args.hf:
            hf_model = load_transformers(args.load, args.device)
            forward, vocab, params = transformers_forward(hf_model), hf_model.config.vocab_size, None
        else:
            model = load_any(args.load, args.device)
            config, vocab = model.config, model.config.vocab_size
            if args.subnet:
                importance = (load_importance(args.importance, args.layer_metric, config)
                              if args.importance else None)
                subnet = SubnetConfig.load(args.subnet, config, importance)
            params = (subnet.num_parameters(config, include_embeddings=False) if subnet
                      else config.num_parameters(include_embeddings=False))
            index = subnet_indices(config, subnet, args.device) if subnet else None
            forward = lambda tokens: model(tokens, subnet=index)  # noqa: E731
        check_vocab(batches, vocab)
        result = evaluate(forward, batches, args.device, desc="eval (transformers)" if args.hf else "eval")
    except (ValueError, OSError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    elapsed = time.time() - start
    print(f"loss {result.loss:.6f} | perplexity {result.perplexity:.4f} | tokens {result.tokens} | "
          f"{elapsed:.1f} s ({result.tokens / elapsed:.0f} tokens/s)")
    if args.output:
        record = {
            "load": args.load, "data_path": args.data_path, "model": "transformers" if args.hf else "ours",
            "subnet": args.subnet, "importance": args.importance, "non_embedding_params": params,
            "split_name": args.split_name,
            "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "eval_iters": args.eval_iters,
            "seed": args.seed, "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
        }
        with open(args.output, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
