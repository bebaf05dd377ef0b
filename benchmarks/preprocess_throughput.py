"""Throughput of tools/preprocess_data.py against the bare tokenizer on the same text, as an interleaved A/B.

    python benchmarks/preprocess_throughput.py [--corpus corpus.jsonl] [--tokenizer DIR] [--max-mb 20]
        [--workers 1 2] [--rounds 3] [--output results.json]

The baseline is the physical limit of the step: the Rust tokenizer's own batched ``encode_batch``
(all cores) on texts already in memory, no JSON parsing and no writing (the tokenizer is loaded afresh
each round, untimed). The tool is timed end to end (subprocess wall clock, start-up included) and by its
own processing time (after start-up and tokenizer load, from its summary line).

The arms are interleaved so that a change in machine load hits them alike: each of ``--rounds`` rounds
measures the baseline, then the tool once with each ``--workers`` value (B T1 T2, B T1 T2, ...), every tool
run writing to a fresh temporary output prefix that is removed once read. Each tool run is divided by the
baseline of its own round; the table reports, per worker count, the median of these pairwise ratios with
their min and max over the rounds, and the median tokens/s and MB/s (of JSON ``text``, the same bytes for
both arms) of every arm. ``--output`` writes every measurement as JSON (replacing the file if it exists).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_subnet.cache import cache_dir  # noqa: E402
from megatron_subnet.outputs import (  # noqa: E402
    OutputError,
    check_not_nested,
    check_writable_location,
    write_text_atomically,
)

# The tool's summary line: "documents: D, tokens: T, skipped lines: S (...), 1.2 s, 123456 tokens/s". Its
# seconds are rounded to 0.1 s, so the processing time is taken from tokens / (tokens/s), which is exact to
# a token per second.
SUMMARY = re.compile(r"tokens: (\d+),.*?, ([\d.]+) s, (\d+) tokens/s")


class BenchmarkError(Exception):
    """A failure reported as one ``error:`` line."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(cache_dir() / "demo_corpus" / "corpus.jsonl"))
    p.add_argument("--tokenizer", default=str(cache_dir() / "smollm2-135m-instruct"))
    p.add_argument("--max-mb", type=float, default=None, help="use only the first N MB of the corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (baseline, then each --workers)")
    p.add_argument("--output", help="also write every measurement as JSON here")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be at least 1")
    if any(w < 1 for w in args.workers):
        p.error(f"--workers {' '.join(map(str, args.workers))}: each must be at least 1")
    if args.max_mb is not None and not args.max_mb > 0:
        p.error(f"--max-mb {args.max_mb:g}: must be more than 0")
    return args


def check_inputs(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.corpus):
        raise BenchmarkError(f"--corpus {args.corpus}: not found; make it with `python tools/fetch_demo_corpus.py`")
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        raise BenchmarkError(
            f"--tokenizer {args.tokenizer}: no tokenizer.json there; make it with `python tools/fetch_teacher.py`"
        )
    if args.output:
        try:
            check_writable_location(args.output, "--output")
            check_not_nested(args.output, "--output", {"--corpus": args.corpus, "--tokenizer": args.tokenizer})
        except OutputError as e:
            raise BenchmarkError(str(e)) from None


def slice_corpus(src_path: str, dst_path: str, max_mb: float) -> None:
    """The first whole lines of ``src_path`` up to ``max_mb`` MB (at least one line)."""
    limit = int(max_mb * 1e6)
    with open(src_path, encoding="utf-8") as src, open(dst_path, "w", encoding="utf-8") as dst:
        written = 0
        for line in src:
            if written >= limit:
                break
            dst.write(line)
            written += len(line.encode("utf-8"))


def read_texts(corpus: str) -> list[str]:
    texts = []
    with open(corpus, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError) as e:
                raise BenchmarkError(f"--corpus {corpus}:{number}: not a JSON object with a 'text' ({e})") from None
    if not texts:
        raise BenchmarkError(f"--corpus {corpus}: no documents")
    return texts


def bare_tokenizer_throughput(tokenizer_dir: str, texts: list[str]) -> tuple[float, int]:
    """Seconds and tokens for the tokenizer's own batched encode over ``texts`` (loading it is not timed)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))  # fresh: no warm cache from last round
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1024):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 1024], add_special_tokens=False))
    return time.perf_counter() - start, tokens


def run_tool(corpus: str, tokenizer_dir: str, workers: int, tmp: str) -> tuple[float, float, int]:
    """(wall seconds, processing seconds, tokens) of one preprocess_data.py run into a fresh output prefix."""
    out_dir = tempfile.mkdtemp(prefix=f"w{workers}-", dir=tmp)
    try:
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "preprocess_data.py"),
            "--input",
            corpus,
            "--output-prefix",
            os.path.join(out_dir, "out"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            tokenizer_dir,
            "--workers",
            str(workers),
        ]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()
        raise BenchmarkError(f"preprocess_data.py --workers {workers} failed: {lines[-1]}")
    summary = SUMMARY.search(result.stdout)
    if summary is None:
        raise BenchmarkError(f"preprocess_data.py --workers {workers}: no summary line in its output")
    tokens, tokens_per_s = int(summary.group(1)), int(summary.group(3))
    processing = tokens / tokens_per_s if tokens_per_s else float(summary.group(2))
    return wall, processing, tokens


def spread(values: list[float]) -> str:
    """'1.05x (min 0.98, max 1.10)' for ratios."""
    if len(values) == 1:
        return f"{values[0]:.2f}x (1 round)"
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def main() -> int:
    args = parse_args()
    try:
        check_inputs(args)
        return benchmark(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def benchmark(args: argparse.Namespace) -> int:
    import tokenizers

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load_start = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="preprocess-throughput-") as tmp:
        corpus = args.corpus
        if args.max_mb is not None:
            corpus = os.path.join(tmp, "slice.jsonl")
            slice_corpus(args.corpus, corpus, args.max_mb)
        texts = read_texts(corpus)
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        text_mb = text_bytes / 1e6
        print(
            f"corpus: {args.corpus}" + (f" (first {args.max_mb:g} MB)" if args.max_mb is not None else "")
            + f", {len(texts)} documents, {text_mb:.2f} MB of text; {cores} cores ({usable} usable); "
            f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
        )  # fmt: skip
        arms = " / ".join(map(str, args.workers))
        print(f"{args.rounds} rounds of: bare tokenizer, then preprocess_data.py --workers {arms}")

        rounds = []
        for r in range(1, args.rounds + 1):
            seconds, tokens = bare_tokenizer_throughput(args.tokenizer, texts)
            base_tps = tokens / seconds
            baseline = {"seconds": seconds, "tokens": tokens, "tokens_per_s": base_tps, "mb_per_s": text_mb / seconds}
            line = f"round {r}: bare {base_tps:,.0f} tokens/s ({seconds:.2f} s)"
            tools = []
            for workers in args.workers:
                wall, processing, tool_tokens = run_tool(corpus, args.tokenizer, workers, tmp)
                if tool_tokens != tokens:
                    raise BenchmarkError(
                        f"preprocess_data.py --workers {workers} wrote {tool_tokens} tokens, the tokenizer gave "
                        f"{tokens} (lines the tool skipped?)"
                    )
                run = {
                    "workers": workers,
                    "wall_s": wall,
                    "processing_s": processing,
                    "tokens": tool_tokens,
                    "tokens_per_s": tokens / processing,
                    "mb_per_s": text_mb / processing,
                    "wall_tokens_per_s": tokens / wall,
                    "wall_mb_per_s": text_mb / wall,
                    "ratio": tokens / processing / base_tps,
                    "wall_ratio": tokens / wall / base_tps,
                }
                tools.append(run)
                line += (
                    f"; w{workers} {run['ratio']:.2f}x ({processing:.2f} s), "
                    f"{run['wall_ratio']:.2f}x with start-up ({wall:.2f} s)"
                )
            print(line, flush=True)
            rounds.append({"round": r, "load_average": os.getloadavg(), "baseline": baseline, "tools": tools})
    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()

    def med(xs: list[dict], key: str) -> float:
        return statistics.median(x[key] for x in xs)

    bases = [r["baseline"] for r in rounds]
    summary = {
        "baseline": {
            "tokens_per_s": med(bases, "tokens_per_s"),
            "mb_per_s": med(bases, "mb_per_s"),
            "tokens_per_s_min": min(b["tokens_per_s"] for b in bases),
            "tokens_per_s_max": max(b["tokens_per_s"] for b in bases),
        },
        "workers": [],
    }
    print(
        f"\n{len(texts)} documents, {text_mb:.2f} MB of text, {args.rounds} rounds; ratio = tool tokens/s / the same "
        "round's bare-tokenizer tokens/s, median over rounds (min, max)\n\n"
        "| arm | median tokens/s | median MB/s | vs bare tokenizer |\n|---|---:|---:|---:|"
    )
    b = summary["baseline"]
    print(f"| bare tokenizer encode_batch | {b['tokens_per_s']:,.0f} | {b['mb_per_s']:.2f} | 1 (reference) |")
    for workers in args.workers:
        mine = [t for r in rounds for t in r["tools"] if t["workers"] == workers]
        ratios, wall_ratios = [t["ratio"] for t in mine], [t["wall_ratio"] for t in mine]
        s = {
            "workers": workers,
            "tokens_per_s": med(mine, "tokens_per_s"),
            "mb_per_s": med(mine, "mb_per_s"),
            "wall_tokens_per_s": med(mine, "wall_tokens_per_s"),
            "wall_mb_per_s": med(mine, "wall_mb_per_s"),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "wall_ratio_median": statistics.median(wall_ratios),
            "wall_ratio_min": min(wall_ratios),
            "wall_ratio_max": max(wall_ratios),
        }
        summary["workers"].append(s)
        print(f"| preprocess_data.py --workers {workers}, processing | {s['tokens_per_s']:,.0f} | "
              f"{s['mb_per_s']:.2f} | {spread(ratios)} |")  # fmt: skip
        print(f"| preprocess_data.py --workers {workers}, with start-up | {s['wall_tokens_per_s']:,.0f} | "
              f"{s['wall_mb_per_s']:.2f} | {spread(wall_ratios)} |")  # fmt: skip
    print(
        f"\nbare tokenizer over the rounds: {b['tokens_per_s_min']:,.0f} to {b['tokens_per_s_max']:,.0f} tokens/s "
        f"({b['tokens_per_s_max'] / b['tokens_per_s_min'] - 1:.0%} apart; a wide spread means a busy machine)"
    )
    print(
        f"load average (1/5/15 min) before {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, after "
        f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} (with this benchmark's own), on {cores} cores "
        f"({usable} usable)"
    )
    print(f"{elapsed:.0f} s in all")
    if args.output:
        result = {
            "args": vars(args),
            "corpus": {"documents": len(texts), "text_bytes": text_bytes},
            "cores": cores,
            "usable_cores": usable,
            "tokenizers_version": tokenizers.__version__,
            "python": sys.version.split()[0],
            "load_average": {"before": load_start, "after": load_end},
            "seconds": elapsed,
            "order": "each round: baseline, then the tool with each --workers value in the order given",
            "rounds": rounds,
            "summary": summary,
        }
        write_text_atomically(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
