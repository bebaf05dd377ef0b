"""Minitron-style activation importance of a checkpoint's layers, hidden channels, heads and MLP neurons.

    python tools/compute_importance.py --load ckpt/teacher --data-path data/corpus_text_document \\
        [--split 949,50,1] [--split-name train] [--seq-length 512] [--micro-batch-size 4] [--calib-iters 8] \\
        [--drop-loss-iters N] [--layer-metric block|drop_loss] --output importance.safetensors [--overwrite]
    torchrun --nproc-per-node N tools/compute_importance.py --tensor-model-parallel-size N ...
    torchrun --nproc-per-node N tools/compute_importance.py --pipeline-model-parallel-size P \
        [--tensor-model-parallel-size T] ...

The scores order a sub-network's kept indices: ``{"num_layers": ..., "order": "importance"}`` with
``--importance importance.safetensors`` (see megatron_subnet/model/importance.py for the definitions).
An existing ``--output`` is replaced only with ``--overwrite``; scores that are not finite are an error
and write nothing. The FLOPs spent (the parent's calibration forwards plus every layer-dropped evaluation of
the drop loss) are printed and kept in the file's metadata (``flops``, ``calibration_flops``,
``drop_loss_flops``).

``--tensor-model-parallel-size N`` (under torchrun): each rank reads only its shard of ``--load``; the
heads and neurons each rank's hooks see are all-gathered into the global scores, which equal a single
process's (drop-loss and block importance too). Global rank 0 writes ``--output``.

``--pipeline-model-parallel-size P`` (under torchrun, world = TP x PP x DP): each rank reads only its (TP
shard, stage) of ``--load``; the calibration forward runs through the stages, each layer's head, neuron and
block scores come from the stage holding it, the hidden-channel scores sum every stage's norms, and the
drop loss of layer i is one pipelined forward of the model without layer i per batch (L forwards per
drop-loss batch). The scores equal a single process's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.cli import ArgumentParser, nonnegative_int, resolve_device, run_main  # noqa: E402
from megatron_subnet.data.batches import check_vocab, load_batches  # noqa: E402
from megatron_subnet.model.evaluation import load_any  # noqa: E402
from megatron_subnet.model.importance import LAYER_METRICS, compute_importance  # noqa: E402
from megatron_subnet.parallel import state as parallel_state  # noqa: E402
from tools.evaluate import (  # noqa: E402
    add_data_args,
    check_data_inputs,
    check_output_location,
    check_seq_length_early,
    start_model_parallel,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="our checkpoint dir, a Hugging Face dir or a .gguf file")
    add_data_args(p, "train", "--calib-iters", 8)
    p.add_argument("--drop-loss-iters", type=nonnegative_int, default=None,
                   help="batches for the layer drop-loss (default: all calibration batches; 0: skip it)")
    p.add_argument("--layer-metric", choices=LAYER_METRICS, default="block",
                   help="the layer score saved as the default ordering")
    p.add_argument("--output", required=True, help="importance scores file (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    args = p.parse_args(argv)
    if args.layer_metric == "drop_loss" and args.drop_loss_iters == 0:
        p.error("--layer-metric drop_loss needs --drop-loss-iters > 0")
    return args


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    start = time.time()
    # everything that can be checked before loading weights or data
    device = resolve_device(args.device)
    data_files = check_data_inputs(args.data_path, args.split)
    check_output_location(args.output, "file", {"--load": args.load}, data_files, args.overwrite)
    early_config = check_seq_length_early(args.load, args.seq_length)
    device = start_model_parallel(args.load, early_config, args.tensor_model_parallel_size, device,
                                  args.pipeline_model_parallel_size)
    model = load_any(args.load, device)
    model.config.check_seq_length(args.seq_length)  # Hugging Face / GGUF: known once loaded
    batches = load_batches(args.data_path, args.split, args.split_name, args.seq_length, args.micro_batch_size,
                           args.calib_iters, args.seed)
    check_vocab(batches, model.config.vocab_size)
    importance = compute_importance(model, batches, args.drop_loss_iters, args.layer_metric)
    try:
        importance.check_finite()
    except ValueError as e:
        raise ValueError(f"--load {args.load}: {e}; nothing was written to --output") from None
    if parallel_state.get_rank() != 0:
        return 0  # every rank holds the same scores; rank 0 writes them
    importance.metadata.update(load=str(args.load), split_name=args.split_name, seed=str(args.seed))
    importance.save(args.output)
    meta = importance.metadata
    print(f"wrote {args.output}: {meta['num_tokens']} calibration tokens "
          f"({meta['drop_loss_tokens']} for the drop loss), {int(meta['flops']):.3e} FLOPs "
          f"({int(meta['calibration_flops']):.3e} calibration + {int(meta['drop_loss_flops']):.3e} drop loss), "
          f"{time.time() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Errors are one ``error:`` line: exit 1 for bad inputs found at run time, 2 for bad flags."""
    return run_main(_main, argv, error_code=1)


if __name__ == "__main__":
    sys.exit(main())
