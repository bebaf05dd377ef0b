"""Train a sentencepiece tokenizer on JSONL text, for from-scratch runs with a new vocabulary.

    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --vocab-size 32000 --model-prefix tok/spm

Writes ``{model_prefix}.model`` and ``{model_prefix}.vocab``; use them with
``--tokenizer-type SentencePieceTokenizer --tokenizer-model {model_prefix}.model``.

Input is read as ``tools/preprocess_data.py`` reads it: a UTF-8 byte-order mark at the start of a file is
stripped, a line that is not valid UTF-8 (or not JSON, or has no string under ``--json-key``) is skipped,
and a ``.gz`` file that is not gzip data or is cut short stops the run with one line naming it. Existing
outputs are replaced only with ``--overwrite``; both files appear only when training finished. Input with
no usable document is an error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import sentencepiece

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.cli import ArgumentParser, finite_float, positive_int, run_main  # noqa: E402
from megatron_subnet.outputs import check_not_nested, check_output, remove_stale_temps, temp_sibling  # noqa: E402
from tools.preprocess_data import expand_inputs, iter_lines  # noqa: E402

OUTPUT_SUFFIXES = (".model", ".vocab")


MIN_COVERAGE = 0.98  # sentencepiece's own lower bound (it refuses less after reading the whole corpus)


def coverage(text: str) -> float:
    """--character-coverage: a finite number in [0.98, 1], the range sentencepiece accepts."""
    value = finite_float(text)
    if not MIN_COVERAGE <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [{MIN_COVERAGE}, 1] (sentencepiece's range)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL files (.jsonl or .jsonl.gz) or globs")
    p.add_argument("--json-key", default="text", help="key holding the text")
    p.add_argument("--model-prefix", required=True, help="output path prefix for .model and .vocab")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .model/.vocab")
    p.add_argument("--vocab-size", type=positive_int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--character-coverage", type=coverage, default=0.9995,
                   help=f"in [{MIN_COVERAGE}, 1] (default 0.9995)")
    p.add_argument("--max-documents", type=positive_int, default=None, help="train on at most this many documents")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def iter_texts(files: list[str], key: str, limit: int | None) -> Iterator[str]:
    """The non-empty string values of ``key``, in input order; unusable lines (not UTF-8, not a JSON object,
    no string under ``key``) are skipped. Reading errors raise InputError naming the file."""
    count = 0
    for path in files:
        for _, raw in iter_lines(path):
            try:
                value = json.loads(raw.decode("utf-8")).get(key)
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, str) and value:
                yield value
                count += 1
                if limit is not None and count >= limit:
                    return


class _Recorded:
    """Wraps an iterator that sentencepiece consumes in C++ (which turns its errors into a RuntimeError
    holding a traceback): the first error is kept, so it can be reported as itself."""

    def __init__(self, items: Iterator[str]):
        self.items = items
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.items
        except BaseException as e:
            self.error = e
            raise


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = expand_inputs(args.input)
    outputs = [Path(args.model_prefix + suffix) for suffix in OUTPUT_SUFFIXES]
    for out in outputs:
        for f in files:
            check_not_nested(out, "--model-prefix", {"--input": f})
        check_output(out, "--model-prefix", overwrite=args.overwrite)

    texts = iter_texts(files, args.json_key, args.max_documents)
    first = next(texts, None)
    if first is None:
        where = f"--input {files[0]}" if len(files) == 1 else f"--input ({len(files)} files)"
        raise ValueError(f"{where}: no usable document (no line is a JSON object with a non-empty string "
                         f"under {args.json_key!r}); nothing written")
    sentences = _Recorded(itertools.chain([first], texts))

    outputs[0].parent.mkdir(parents=True, exist_ok=True)
    for out in outputs:
        remove_stale_temps(out)
    tmp = temp_sibling(outputs[0])  # a directory: sentencepiece writes both files into it
    tmp.mkdir()
    try:
        tmp_prefix = str(tmp / "spm")
        sentencepiece.set_random_generator_seed(args.seed)
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
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
            if sentences.error is not None:
                raise sentences.error from None
            print(f"error: sentencepiece training failed: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        for suffix, out in zip(OUTPUT_SUFFIXES, outputs):
            os.replace(tmp_prefix + suffix, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {outputs[0]} and {outputs[1]} (vocabulary {args.vocab_size})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: one ``error:`` line and a non-zero exit for bad input, 130 on Ctrl-C."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
