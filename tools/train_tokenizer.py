"""Train a sentencepiece tokenizer on JSONL text, for from-scratch runs with a new vocabulary.

    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --vocab-size 32000 --model-prefix tok/spm

Writes ``{model_prefix}.model`` and ``{model_prefix}.vocab``; use them with
``--tokenizer-type SentencePieceTokenizer --tokenizer-model {model_prefix}.model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator

import sentencepiece

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.preprocess_data import expand_inputs, open_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL files (.jsonl or .jsonl.gz) or globs")
    p.add_argument("--json-key", default="text", help="key holding the text")
    p.add_argument("--model-prefix", required=True, help="output path prefix for .model and .vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def iter_texts(files: list[str], key: str, limit: int | None) -> Iterator[str]:
    """The string values of ``key``, in input order; unusable lines are skipped."""
    count = 0
    for path in files:
        with open_text(path) as f:
            for line in f:
                try:
                    value = json.loads(line).get(key)
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(value, str) and value:
                    yield value
                    count += 1
                    if limit is not None and count >= limit:
                        return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = expand_inputs(args.input)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_prefix = os.path.join(tmp, "spm")
        sentencepiece.set_random_generator_seed(args.seed)
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter_texts(files, args.json_key, args.max_documents),
                model_prefix=tmp_prefix,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                byte_fallback=True,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            print(f"error: sentencepiece training failed: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, args.model_prefix + ext)
    print(f"wrote {args.model_prefix}.model and {args.model_prefix}.vocab (vocabulary {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
