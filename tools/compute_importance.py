"""Minitron-style activation importance of a checkpoint's layers, hidden channels, heads and MLP neurons.

    python tools/compute_importance.py --load ckpt/teacher --data-path data/corpus_text_document \\
        [--split 949,50,1] [--split-name train] [--seq-length 512] [--micro-batch-size 4] [--calib-iters 8] \\
        [--drop-loss-iters N] [--layer-metric block|drop_loss] --output importance.safetensors

The scores order a sub-network's kept indices: ``{"num_layers": ..., "order": "importance"}`` with
``--importance importance.safetensors`` (see megatron_subnet/model/importance.py for the definitions).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.data.batches import check_vocab, load_batches  # noqa: E402
from megatron_subnet.model.evaluation import load_any  # noqa: E402
from megatron_subnet.model.importance import LAYER_METRICS, compute_importance  # noqa: E402
from tools.evaluate import add_data_args, check_data_args  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="our checkpoint dir, a Hugging Face dir or a .gguf file")
    add_data_args(p, "train", "--calib-iters", 8)
    p.add_argument("--drop-loss-iters", type=int, default=None,
                   help="batches for the layer drop-loss (default: all calibration batches; 0: skip it)")
    p.add_argument("--layer-metric", choices=LAYER_METRICS, default="block",
                   help="the layer score saved as the default ordering")
    p.add_argument("--output", required=True, help="importance scores file (.safetensors)")
    args = p.parse_args(argv)
    check_data_args(p, args, args.calib_iters)
    if args.drop_loss_iters is not None and args.drop_loss_iters < 0:
        p.error(f"--drop-loss-iters {args.drop_loss_iters}: must be >= 0")
    if args.layer_metric == "drop_loss" and args.drop_loss_iters == 0:
        p.error("--layer-metric drop_loss needs --drop-loss-iters > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        model = load_any(args.load, args.device)
        batches = load_batches(args.data_path, args.split, args.split_name, args.seq_length, args.micro_batch_size,
                               args.calib_iters, args.seed)
        check_vocab(batches, model.config.vocab_size)
        importance = compute_importance(model, batches, args.drop_loss_iters, args.layer_metric)
        importance.metadata.update(load=str(args.load), split_name=args.split_name, seed=str(args.seed))
        importance.save(args.output)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = importance.metadata
    print(f"wrote {args.output}: {meta['num_tokens']} calibration tokens "
          f"({meta['drop_loss_tokens']} for the drop loss), {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
