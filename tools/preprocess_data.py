"""Tokenize JSONL documents into Megatron .bin/.idx datasets, one pair per --json-keys key.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ckpt/teacher --workers 2 --append-eod

Writes ``{output_prefix}_{key}_document.{bin,idx}``. Documents keep input order, so the output is
byte-identical for any ``--workers``. A line that is not JSON, lacks a key or has a non-string value
is skipped and counted (``--strict`` makes it fatal).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.data.indexed import IndexedDatasetBuilder, token_dtype  # noqa: E402
from megatron_subnet.data.tokenizer import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer  # noqa: E402

LINES_PER_BATCH = 256
BYTES_PER_BATCH = 1 << 20  # small batches keep the workers evenly loaded to the end
REPORTED_BAD_LINES = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+", help="JSONL files (.jsonl or .jsonl.gz) or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON line")
    g.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-model", help="HF tokenizer directory or .gguf file; sentencepiece .model")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (NullTokenizer only)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output .bin/.idx files")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=1000, help="update the progress statistics every N documents")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be at least 1")
    if args.log_interval < 1:
        p.error(f"--log-interval {args.log_interval}: must be at least 1")
    return args


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs in order, keeping each file once; raises FileNotFoundError naming the pattern."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no file matches")
        for path in matches:
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise FileNotFoundError(f"--input {path}: not a readable file")
            if path not in files:
                files.append(path)
    return files


def open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_batches(files: list[str]) -> Iterator[list[tuple[str, int, str]]]:
    """(file, line number, raw line) in input order, up to LINES_PER_BATCH lines or BYTES_PER_BATCH
    characters at a time; blank lines dropped."""
    batch: list[tuple[str, int, str]] = []
    size = 0
    for path in files:
        with open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    batch.append((path, number, line))
                    size += len(line)
                if len(batch) == LINES_PER_BATCH or size >= BYTES_PER_BATCH:
                    yield batch
                    batch, size = [], 0
    if batch:
        yield batch


@dataclass
class EncodedBatch:
    """Tokens of the good lines of one batch: per key, one flat array plus each document's length."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    num_bytes: int
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (file:line, kind, detail)


class Encoder:
    """Parses and tokenizes batches; one instance per worker process."""

    def __init__(self, args: argparse.Namespace, tokenizer: Tokenizer | None = None):
        self.keys = args.json_keys
        self.append_eod = args.append_eod
        self.tokenizer = tokenizer or build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        self.dtype = token_dtype(self.tokenizer.vocab_size)

    def check(self, line: str) -> tuple[str, str] | None:
        """None for a usable line, else (kind, detail) of what is wrong with it."""
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            return "not JSON", e.msg
        if not isinstance(doc, dict):
            return "not JSON", f"a {type(doc).__name__}, not an object"
        for key in self.keys:
            if key not in doc:
                return "missing key", repr(key)
            if not isinstance(doc[key], str):
                return "non-string value", f"{key!r} is {type(doc[key]).__name__}"
        return None

    def encode(self, batch: list[tuple[str, int, str]]) -> EncodedBatch:
        texts: dict[str, list[str]] = {key: [] for key in self.keys}
        bad: list[tuple[str, str, str]] = []
        num_bytes = 0
        for path, number, line in batch:
            num_bytes += len(line.encode("utf-8"))
            problem = self.check(line)
            if problem is not None:
                bad.append((f"{path}:{number}", *problem))
                continue
            doc = json.loads(line)
            for key in self.keys:
                texts[key].append(doc[key])
        tokens, lengths = {}, {}
        for key in self.keys:
            ids = self.tokenizer.tokenize_batch(texts[key])
            if self.append_eod:
                for doc_ids in ids:
                    doc_ids.append(self.tokenizer.eod)
            lengths[key] = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            tokens[key] = np.fromiter(
                itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths[key].sum())
            )
        return EncodedBatch(tokens, lengths, num_bytes, bad)


_worker_encoder: Encoder | None = None


def _init_worker(args: argparse.Namespace) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(args)


def _encode_in_worker(batch: list[tuple[str, int, str]]) -> EncodedBatch:
    return _worker_encoder.encode(batch)


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = expand_inputs(args.input)
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    except (FileNotFoundError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    encoder = Encoder(args, tokenizer)
    builders = {
        key: IndexedDatasetBuilder(output_prefix(args.output_prefix, key), encoder.dtype) for key in args.json_keys
    }
    total_bytes = (
        sum(os.path.getsize(f) for f in files if not f.endswith(".gz"))
        if not any(f.endswith(".gz") for f in files)
        else None
    )

    pool = None
    if args.workers > 1:
        # Each worker runs single-threaded; the processes are the parallelism.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(args.workers, initializer=_init_worker, initargs=(args,))
        results = pool.imap(_encode_in_worker, read_batches(files), chunksize=1)
    else:
        results = map(encoder.encode, read_batches(files))

    documents = tokens = 0
    skipped: Counter[str] = Counter()
    start = time.time()
    next_log = args.log_interval
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None)
    try:
        for result in results:
            for where, kind, detail in result.bad:
                if args.strict:
                    raise ValueError(f"{where}: {kind} ({detail})")
                skipped[kind] += 1
                if sum(skipped.values()) <= REPORTED_BAD_LINES:
                    tqdm.write(f"skipped {where}: {kind} ({detail})", file=sys.stderr)
            for key, builder in builders.items():
                builder.add_documents(result.tokens[key], result.lengths[key])
            documents += len(result.lengths[args.json_keys[0]])
            tokens += sum(len(t) for t in result.tokens.values())
            bar.update(result.num_bytes)
            if documents >= next_log:
                elapsed = max(time.time() - start, 1e-9)
                bar.set_postfix(docs_per_s=f"{documents / elapsed:.0f}", tokens_per_s=f"{tokens / elapsed:.0f}")
                next_log = documents + args.log_interval
        for builder in builders.values():
            builder.finalize()
    except (ValueError, OSError, KeyboardInterrupt) as e:
        for builder in builders.values():
            builder.abort()
        if isinstance(e, KeyboardInterrupt):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    elapsed = max(time.time() - start, 1e-9)
    reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))
    print(
        f"documents: {documents}, tokens: {tokens}, skipped lines: {sum(skipped.values())}"
        + (f" ({reasons})" if reasons else "")
        + f", {elapsed:.1f} s, {tokens / elapsed:.0f} tokens/s"
    )
    for key in args.json_keys:
        print(f"wrote {output_prefix(args.output_prefix, key)}.{{bin,idx}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
