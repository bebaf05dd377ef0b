"""Tokenize JSONL documents into Megatron .bin/.idx datasets, one pair per --json-keys key.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ckpt/teacher --workers 2 --append-eod

Writes ``{output_prefix}_{key}_document.{bin,idx}``. Documents keep input order, so the output is
byte-identical for any ``--workers``. A line that is not JSON, lacks a key or has a non-string value
is skipped and counted (``--strict`` makes it fatal); so is a line that is not valid UTF-8.

Text decoding: each line is read as bytes and decoded as strict UTF-8. A UTF-8 byte-order mark at the
start of a file is stripped (it is not part of the first document); a line with invalid UTF-8 is a bad
line ("invalid UTF-8"), skipped, counted and reported like any other bad line, never decoded with
replacement characters. A ``.gz`` input that is not gzip data, or is cut short, and a file that cannot be
read, stop the run with one line naming the file; nothing is written.

Outputs: existing ones are replaced only with ``--overwrite`` (checked, with where they go, before any
tokenizing); they appear only when complete (temporaries are renamed into place), and temporaries a
killed run left behind are removed by the next run. A run in which no line gives a document is an error
and writes nothing. More than ``--warn-skipped-percent`` of the non-blank lines skipped gives one
``warning:`` line. Ctrl-C exits 130 and leaves no output and no temporary.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.cli import ArgumentParser, finite_float, one_line, positive_int, run_main  # noqa: E402
from megatron_subnet.data.indexed import IndexedDatasetBuilder, bin_path, idx_path, token_dtype  # noqa: E402
from megatron_subnet.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer  # noqa: E402
from megatron_subnet.outputs import check_not_nested, check_output  # noqa: E402

LINES_PER_BATCH = 256
BYTES_PER_BATCH = 1 << 20  # small batches keep the workers evenly loaded to the end
REPORTED_BAD_LINES = 5
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # UTF-16 LE/BE (UTF-32 LE starts like 16 LE), 32 BE
READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError

Line = tuple[str, int, bytes]  # (file, line number, raw bytes of the line)


class InputError(ValueError):
    """An --input file that cannot be read as (gzipped) UTF-8 JSONL; the message names it."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+", help="JSONL files (.jsonl or .jsonl.gz) or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON line")
    g.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    g.add_argument("--warn-skipped-percent", type=finite_float, default=1.0, metavar="PERCENT",
                   help="print a warning when more than this percentage of the non-blank lines is skipped "
                   "(default 1.0)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-model", help="HF tokenizer directory or .gguf file; sentencepiece .model")
    g.add_argument("--vocab-size", type=positive_int, help="vocabulary size (NullTokenizer only)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output .bin/.idx files")
    g.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=positive_int, default=1000,
                   help="update the progress statistics every N documents")
    args = p.parse_args(argv)
    if args.warn_skipped_percent < 0:
        p.error(f"argument --warn-skipped-percent: {args.warn_skipped_percent} must be >= 0")
    repeated = [key for key, n in Counter(args.json_keys).items() if n > 1]
    if repeated:
        p.error(f"argument --json-keys: {repeated[0]!r} is given more than once")
    return args


def check_input(path: str) -> None:
    """InputError unless ``path``'s first bytes fit its name (gzip data exactly when it ends in .gz) and it is
    not UTF-16/32 text. Cheap: reads a few bytes."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        gz = path.endswith(".gz")
        if gz and magic and magic != GZIP_MAGIC:
            raise InputError(f"--input {path}: named .gz but not gzip data")
        if not gz and magic == GZIP_MAGIC:
            raise InputError(f"--input {path}: gzip-compressed data; name it *.gz")
        with open_binary(path) as f:
            head = f.read(4)
    except READ_ERRORS as e:
        raise InputError(read_error(path, e)) from None
    if head.startswith(_OTHER_BOMS):
        raise InputError(f"--input {path}: UTF-16 or UTF-32 text (byte-order mark); convert it to UTF-8")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs in order, keeping each file once; raises FileNotFoundError naming the pattern, and
    InputError for a file whose first bytes show it cannot be read (``check_input``)."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no file matches")
        for path in matches:
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise FileNotFoundError(f"--input {path}: not a readable file")
            if path not in files:
                check_input(path)
                files.append(path)
    return files


def open_binary(path: str) -> BinaryIO:
    """The file's bytes, decompressed when it ends in .gz."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_error(path: str, error: BaseException, line: int | None = None) -> str:
    """One line naming ``path`` for an error raised while reading it."""
    where = f"--input {path}" + (f" (after line {line})" if line else "")
    if isinstance(error, EOFError):
        return f"{where}: truncated gzip file ({error})"
    if isinstance(error, gzip.BadGzipFile):
        return f"{where}: not valid gzip data ({error})"
    if isinstance(error, zlib.error):
        return f"{where}: corrupt gzip data ({error})"
    return f"{where}: cannot read ({getattr(error, 'strerror', None) or error})"


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of one file, with a leading UTF-8 byte-order mark stripped; reading errors
    become an InputError naming the file."""
    number = 0
    try:
        with open_binary(path) as f:
            for number, line in enumerate(f, start=1):
                if number == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM) :]
                yield number, line
    except READ_ERRORS as e:
        raise InputError(read_error(path, e, number)) from None


def decode_line(raw: bytes) -> tuple[str | None, str]:
    """(text, "") for valid UTF-8, else (None, what is wrong)."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"


def read_batches(files: list[str]) -> Iterator[list[Line]]:
    """(file, line number, raw line) in input order, up to LINES_PER_BATCH lines or BYTES_PER_BATCH
    bytes at a time; blank lines dropped."""
    batch: list[Line] = []
    size = 0
    for path in files:
        for number, line in iter_lines(path):
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

    def parse(self, line: str) -> tuple[dict | None, tuple[str, str] | None]:
        """(document, None) for a usable line, else (None, (kind, detail) of what is wrong with it)."""
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            return None, ("not JSON", e.msg)
        if not isinstance(doc, dict):
            return None, ("not JSON", f"a {type(doc).__name__}, not an object")
        for key in self.keys:
            if key not in doc:
                return None, ("missing key", repr(key))
            if not isinstance(doc[key], str):
                return None, ("non-string value", f"{key!r} is {type(doc[key]).__name__}")
        return doc, None

    def check(self, line: str) -> tuple[str, str] | None:
        """None for a usable line, else (kind, detail) of what is wrong with it."""
        return self.parse(line)[1]

    def encode(self, batch: list[Line]) -> EncodedBatch:
        texts: dict[str, list[str]] = {key: [] for key in self.keys}
        bad: list[tuple[str, str, str]] = []
        num_bytes = 0
        for path, number, raw in batch:
            num_bytes += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append((f"{path}:{number}", "invalid UTF-8", decode_line(raw)[1]))
                continue
            doc, problem = self.parse(line)
            if problem is not None:
                bad.append((f"{path}:{number}", *problem))
                continue
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
    # Ctrl-C reaches the whole process group: the parent handles it (and terminates the pool), the workers
    # must not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_encoder = Encoder(args)


def _encode_in_worker(batch: list[Line]) -> EncodedBatch:
    return _worker_encoder.encode(batch)


def stop_pool(pool, timeout: float = 10.0) -> None:
    """``pool.terminate()``, bounded. CPython's terminate can block for good when it stops the result handler
    while a worker is still sending a large result (the worker holds the result queue's lock on a full
    pipe, and terminate's sentinel waits for that lock); after ``timeout`` seconds the workers are killed
    and the blocked terminate is left to its daemon thread."""
    stopper = threading.Thread(target=pool.terminate, daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        for child in multiprocessing.active_children():
            child.kill()
            child.join()


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def check_outputs(args: argparse.Namespace, files: list[str]) -> None:
    """Before any work: every output can be written where it goes, replaces nothing without --overwrite,
    and is none of the inputs (nor inside one)."""
    for key in args.json_keys:
        prefix = output_prefix(args.output_prefix, key)
        for path in (bin_path(prefix), idx_path(prefix)):
            for f in files:
                check_not_nested(path, "--output-prefix", {"--input": f})
            check_output(path, "--output-prefix", overwrite=args.overwrite,
                         inputs={"--tokenizer-model": args.tokenizer_model})


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    check_outputs(args, files)  # after the tokenizer loads (so a bad --tokenizer-model is named as such)
    encoder = Encoder(args, tokenizer)
    total_bytes = (
        sum(os.path.getsize(f) for f in files if not f.endswith(".gz"))
        if not any(f.endswith(".gz") for f in files)
        else None
    )

    builders: dict[str, IndexedDatasetBuilder] = {}
    pool = None
    documents = tokens = 0
    skipped: Counter[str] = Counter()
    first_bad: list[str] = []  # the first REPORTED_BAD_LINES bad lines, as "file:line: kind (detail)"
    reported = 0  # how many of them are printed: held back until the first document, so that a run
    # that finds none says it all in its one error line
    start = time.time()
    next_log = args.log_interval
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None)
    try:
        for key in args.json_keys:
            builders[key] = IndexedDatasetBuilder(output_prefix(args.output_prefix, key), encoder.dtype)
        if args.workers > 1:
            # Each worker runs single-threaded; the processes are the parallelism.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(args.workers, initializer=_init_worker, initargs=(args,))
            results = pool.imap(_encode_in_worker, read_batches(files), chunksize=1)
        else:
            results = map(encoder.encode, read_batches(files))
        for result in results:
            for where, kind, detail in result.bad:
                if args.strict:
                    raise ValueError(f"{where}: {kind} ({detail})")
                skipped[kind] += 1
                if len(first_bad) < REPORTED_BAD_LINES:
                    first_bad.append(f"{where}: {kind} ({detail})")
            for key, builder in builders.items():
                builder.add_documents(result.tokens[key], result.lengths[key])
            documents += len(result.lengths[args.json_keys[0]])
            tokens += sum(len(t) for t in result.tokens.values())
            if documents and reported < len(first_bad):
                for report in first_bad[reported:]:
                    tqdm.write(f"skipped {report}", file=sys.stderr)
                reported = len(first_bad)
            bar.update(result.num_bytes)
            if documents >= next_log:
                elapsed = max(time.time() - start, 1e-9)
                bar.set_postfix(docs_per_s=f"{documents / elapsed:.0f}", tokens_per_s=f"{tokens / elapsed:.0f}")
                next_log = documents + args.log_interval
        if documents == 0:
            raise ValueError(no_documents_message(files, skipped, first_bad))
        for builder in builders.values():
            builder.finalize()
    except (ValueError, OSError, KeyboardInterrupt) as e:
        if pool is not None:
            stop_pool(pool)  # before the temporaries go: no worker may still be running
            pool = None
        for builder in builders.values():
            builder.abort()
        if isinstance(e, KeyboardInterrupt):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    elapsed = max(time.time() - start, 1e-9)
    total_skipped = sum(skipped.values())
    reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))
    print(
        f"documents: {documents}, tokens: {tokens}, skipped lines: {total_skipped}"
        + (f" ({reasons})" if reasons else "")
        + f", {elapsed:.1f} s, {tokens / elapsed:.0f} tokens/s"
    )
    percent = 100.0 * total_skipped / (documents + total_skipped)
    if total_skipped and percent > args.warn_skipped_percent:
        print(
            f"warning: skipped {total_skipped} of {documents + total_skipped} non-blank lines ({percent:.3g}%, "
            f"more than --warn-skipped-percent {args.warn_skipped_percent:g}): {reasons}; first: "
            + "; ".join(first_bad),
            file=sys.stderr,
        )
    for key in args.json_keys:
        print(f"wrote {output_prefix(args.output_prefix, key)}.{{bin,idx}}")
    return 0


def no_documents_message(files: list[str], skipped: Counter[str], first_bad: list[str]) -> str:
    where = f"--input {files[0]}" if len(files) == 1 else f"--input ({len(files)} files)"
    if not skipped:
        return f"{where}: 0 documents: no non-blank lines; nothing written"
    total = sum(skipped.values())
    reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))
    return (
        f"{where}: 0 documents: all {total} non-blank lines were skipped ({reasons}); nothing written; "
        f"first: {'; '.join(first_bad)}"
    )


def main(argv: list[str] | None = None) -> int:
    """The command line: one ``error:`` line and a non-zero exit for bad input, 130 on Ctrl-C."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
