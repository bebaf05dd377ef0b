"""Loss and perplexity of a checkpoint, dense or as a masked sub-network, on one split of an indexed dataset.

    python tools/evaluate.py --load ckpt/teacher --data-path data/corpus_text_document \\
        [--split 949,50,1] [--split-name valid] [--seq-length 512] [--micro-batch-size 4] [--eval-iters 16] \\
        [--subnet SUBNET.json [--importance FILE]] [--hf] [--output results.jsonl]
    torchrun --nproc-per-node N tools/evaluate.py --tensor-model-parallel-size N ...
    torchrun --nproc-per-node N tools/evaluate.py --load CKPT --pipeline-model-parallel-size P \
        [--tensor-model-parallel-size T] ...                           # N = T x P x data-parallel replicas

``--load`` takes our checkpoint directory, a Hugging Face directory or a ``.gguf`` file. ``--hf`` runs
transformers' own model on the same batches instead of ours. Samples are Megatron's GPT samples
(``--seed`` shuffles them); the loss is the fp32 cross-entropy averaged over all label tokens.
``--output`` is appended to (never replaced) and may not be or lie inside an input; a loss that is not
finite is an error and appends nothing. Flags, the output and (for our checkpoints) ``--seq-length`` and
``--subnet`` are checked before the data and the weights are read.

``--tensor-model-parallel-size N`` (under torchrun): each rank reads only its shard of our checkpoint
(consolidated or saved at any TP size; a Hugging Face / GGUF model is read whole, then sharded) and the
loss is the vocab-parallel cross-entropy, so no rank builds whole-vocabulary logits; the result equals a
single process's. ``--hf`` runs at TP 1 only. Global rank 0 prints and appends the result.

``--pipeline-model-parallel-size P`` (under torchrun, world = TP x PP x DP): the layers are split evenly
over P stages and each rank reads only its (TP shard, stage) of ``--load`` (consolidated or saved at any
TP x PP layout); every batch runs through the stages in the forward-only schedule, the last stage sums the
cross-entropy and broadcasts it, so every rank holds the single process's result. More stages than layers
is refused with one line; ``--hf`` runs at PP 1 only. Data-parallel replicas repeat the same evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.cli import ArgumentParser, nonnegative_int, positive_int, resolve_device, run_main  # noqa: E402
from megatron_subnet.data.batches import check_vocab, load_batches  # noqa: E402
from megatron_subnet.data.gpt_dataset import SPLIT_NAMES, parse_data_path, parse_split  # noqa: E402
from megatron_subnet.data.indexed import bin_path, dataset_exists, idx_path  # noqa: E402
from megatron_subnet.initialize import initialize_distributed  # noqa: E402
from megatron_subnet.model.config import ModelConfig  # noqa: E402
from megatron_subnet.model.evaluation import (  # noqa: E402
    checkpoint_kind,
    evaluate,
    evaluate_model,
    load_any,
    load_transformers,
    transformers_forward,
)
from megatron_subnet.model.importance import LAYER_METRICS, load_importance  # noqa: E402
from megatron_subnet.model.shapes import check_divisible  # noqa: E402
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices  # noqa: E402
from megatron_subnet.model.weights import load_config  # noqa: E402
from megatron_subnet.outputs import OutputError, check_not_nested, check_output  # noqa: E402
from megatron_subnet.parallel import state as parallel_state  # noqa: E402
from megatron_subnet.parallel.pipeline import split_layers  # noqa: E402


def add_data_args(p: argparse.ArgumentParser, split_name: str, iters_flag: str, iters: int) -> None:
    """The data flags shared by evaluate.py and compute_importance.py."""
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True, help="dataset prefix, or 'weight prefix' pairs")
    g.add_argument("--split", default="949,50,1", help="train,valid,test proportions of the documents")
    g.add_argument("--split-name", default=split_name, choices=SPLIT_NAMES, help="which split to read")
    g.add_argument("--seq-length", type=positive_int, default=512, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=positive_int, default=4, help="samples per batch")
    g.add_argument(iters_flag, type=positive_int, default=iters, help="number of batches")
    g.add_argument("--seed", type=nonnegative_int, default=1234, help="seed of the sample shuffle")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_parallel_args(g)


def add_parallel_args(g) -> None:
    """``--tensor-model-parallel-size`` and ``--pipeline-model-parallel-size`` (evaluate, importance, search)."""
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1,
                   help="split the model over this many ranks (under torchrun; the world must be a multiple)")
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1,
                   help="split the layers evenly over this many pipeline stages (under torchrun; the world must "
                   "be a multiple of tensor x pipeline size)")


def start_model_parallel(load: str, config: ModelConfig | None, tp: int, device: str, pp: int = 1) -> str:
    """Check that our checkpoint's ``config`` (None: not known before loading) splits into ``tp`` tensor-parallel
    ranks and ``pp`` pipeline stages, then join the launcher's process group with ``tp`` x ``pp`` model
    parallelism; returns this rank's device."""
    if config is not None:
        try:
            check_divisible(config, tp)
        except ValueError as e:
            raise ValueError(f"--load {load}: cannot be split into {tp} tensor-parallel shards: {e}") from None
        try:
            split_layers(config.num_layers, pp)
        except ValueError as e:
            raise ValueError(f"--load {load}: {e}") from None
    rank_device = initialize_distributed(tensor_parallel=tp, pipeline_parallel=pp, device=device,
                                         deepspeed_comm=False)  # fmt: skip
    return device if parallel_state.get_world_size() == 1 else rank_device  # one process: the device asked for


start_tensor_parallel = start_model_parallel  # the TP-era name


def check_data_inputs(data_path: list[str], split: str) -> list[str]:
    """The ``.bin``/``.idx`` files of ``--data-path`` (ValueError/FileNotFoundError naming the flag otherwise)."""
    parse_split(split)
    files = []
    for _, prefix in parse_data_path(data_path):
        if not dataset_exists(prefix):
            raise FileNotFoundError(f"--data-path {prefix}: no such file {prefix}.bin/.idx")
        files += [str(bin_path(prefix)), str(idx_path(prefix))]
    return files


def check_output_location(output: str, kind: str, inputs: dict[str, str | None], data_files: list[str],
                          overwrite: bool = False) -> None:
    """``check_output`` for ``--output``, with every ``--data-path`` file as an input too."""
    check_output(output, "--output", kind, overwrite, inputs)
    if kind == "append" and os.path.isfile(output) and not os.access(output, os.W_OK):
        raise OutputError(f"--output {output}: is not writable")
    for path in data_files:
        check_not_nested(output, "--output", {"--data-path": path})


def check_seq_length_early(load: str, seq_length: int) -> ModelConfig | None:
    """``--seq-length`` against the positions of ``--load`` when its config can be read without the weights
    (our checkpoints, Hugging Face directories); a ``.gguf`` file is checked once loaded. Returns our
    checkpoint's config (None for the others)."""
    kind = checkpoint_kind(load)
    if kind == "ours":
        config = load_config(load)
        config.check_seq_length(seq_length)
        return config
    if kind == "hf":
        try:
            with open(os.path.join(load, "config.json")) as f:
                positions = json.load(f).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return None  # loading it reports what is wrong
        check_positions(seq_length, positions)
    return None


def check_positions(seq_length: int, positions) -> None:
    if isinstance(positions, int) and seq_length > positions:
        raise ValueError(f"--seq-length {seq_length}: longer than the model's max_position_embeddings {positions}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="our checkpoint dir, a Hugging Face dir or a .gguf file")
    g.add_argument("--subnet", help="sub-network JSON (explicit indices or counts) run masked on the checkpoint")
    g.add_argument("--importance", help="importance scores (.safetensors) for a sub-network with order 'importance'")
    g.add_argument("--layer-metric", choices=LAYER_METRICS, help="layer score to order by (default: the file's)")
    g.add_argument("--hf", action="store_true", help="run transformers' AutoModelForCausalLM instead of ours")
    add_data_args(p, "valid", "--eval-iters", 16)
    p.add_argument("--output", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if args.hf and args.subnet:
        p.error("--hf runs transformers' dense model; it does not take --subnet")
    if args.importance and not args.subnet:
        p.error("--importance only orders a --subnet")
    if args.hf and args.tensor_model_parallel_size > 1:
        p.error("--hf runs transformers' own model in one process: it does not take --tensor-model-parallel-size "
                f"{args.tensor_model_parallel_size}")
    if args.hf and args.pipeline_model_parallel_size > 1:
        p.error("--hf runs transformers' own model in one process: it does not take --pipeline-model-parallel-size "
                f"{args.pipeline_model_parallel_size}")
    return args


def load_subnet(args: argparse.Namespace, config: ModelConfig) -> SubnetConfig:
    importance = load_importance(args.importance, args.layer_metric, config) if args.importance else None
    return SubnetConfig.load(args.subnet, config, importance)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    start = time.time()
    # everything that can be checked before loading data or weights
    device = resolve_device(args.device)
    data_files = check_data_inputs(args.data_path, args.split)
    if args.output:
        inputs = {"--load": args.load, "--subnet": args.subnet, "--importance": args.importance}
        check_output_location(args.output, "append", inputs, data_files)
    early_config = check_seq_length_early(args.load, args.seq_length)
    subnet = load_subnet(args, early_config) if args.subnet and early_config else None
    device = start_model_parallel(args.load, early_config, args.tensor_model_parallel_size, device,
                                  args.pipeline_model_parallel_size)
    try:
        batches = load_batches(args.data_path, args.split, args.split_name, args.seq_length, args.micro_batch_size,
                               args.eval_iters, args.seed)
        if args.hf:
            hf_model = load_transformers(args.load, device)
            forward, vocab, params = transformers_forward(hf_model), hf_model.config.vocab_size, None
            check_positions(args.seq_length, getattr(hf_model.config, "max_position_embeddings", None))
        else:
            model = load_any(args.load, device)
            config, vocab = model.config, model.config.vocab_size
            config.check_seq_length(args.seq_length)
            if args.subnet and subnet is None:
                subnet = load_subnet(args, config)
            params = (subnet.num_parameters(config, include_embeddings=False) if subnet
                      else config.num_parameters(include_embeddings=False))
            index = subnet_indices(config, subnet, device, model.shard) if subnet else None
        check_vocab(batches, vocab)
        if args.hf:
            result = evaluate(forward, batches, device, desc="eval (transformers)")
        else:  # through the pipeline stages when the model is split into them
            result = evaluate_model(model, batches, device, index, desc="eval")
    except IndexError as e:
        raise ValueError(str(e)) from None
    if not math.isfinite(result.loss):
        raise ValueError(f"--load {args.load}: the loss is {result.loss} (not finite: the model's weights hold "
                         "NaN/inf or its activations overflowed); nothing was appended to --output")
    if parallel_state.get_rank() != 0:
        return 0  # every rank computed the same result; rank 0 reports it
    elapsed = time.time() - start
    print(f"loss {result.loss:.6f} | perplexity {result.perplexity:.4f} | tokens {result.tokens} | "
          f"{elapsed:.1f} s ({result.tokens / elapsed:.0f} tokens/s)")
    if args.output:
        record = {
            "load": args.load, "data_path": args.data_path, "model": "transformers" if args.hf else "ours",
            "subnet": args.subnet, "importance": args.importance, "non_embedding_params": params,
            "split_name": args.split_name, "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "eval_iters": args.eval_iters,
            "seed": args.seed, "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Errors are one ``error:`` line: exit 1 for bad inputs found at run time, 2 for bad flags."""
    return run_main(_main, argv, error_code=1)


if __name__ == "__main__":
    sys.exit(main())
