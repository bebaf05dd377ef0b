"""Throughput of tools/preprocess_data.py against the bare tokenizer on the same text, in one run.

    python benchmarks/preprocess_throughput.py [--corpus corpus.jsonl] [--tokenizer DIR] [--max-mb 20]

The baseline is the physical limit of the step: the Rust tokenizer's own batched ``encode_batch``
(all cores) on texts already in memory, no JSON parsing and no writing. The tool is timed end to end
(subprocess wall clock) and by its own processing time (after start-up and tokenizer load).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_subnet.cache import cache_dir  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(cache_dir() / "demo_corpus" / "corpus.jsonl"))
    p.add_argument("--tokenizer", default=str(cache_dir() / "smollm2-135m-instruct"))
    p.add_argument("--max-mb", type=float, default=None, help="use only the first N MB of the corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    return p.parse_args()


def bare_tokenizer_throughput(tokenizer_dir: str, texts: list[str]) -> tuple[float, int]:
    """Seconds and tokens for the tokenizer's own batched encode over ``texts``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1024):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 1024], add_special_tokens=False))
    return time.perf_counter() - start, tokens


def run_tool(corpus: str, tokenizer_dir: str, workers: int, out: str) -> tuple[float, float, int]:
    """(wall seconds, processing seconds, tokens) of one preprocess_data.py run."""
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        corpus,
        "--output-prefix",
        out,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        tokenizer_dir,
        "--workers",
        str(workers),
        "--overwrite",  # every timed run rewrites the same output
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"preprocess_data.py failed: {result.stderr.strip().splitlines()[-1]}")
    summary = re.search(r"tokens: (\d+),.*?, ([\d.]+) s,", result.stdout)
    return wall, float(summary.group(2)), int(summary.group(1))


def main() -> int:
    args = parse_args()
    for path, hint in ((args.corpus, "tools/fetch_demo_corpus.py"), (args.tokenizer, "tools/fetch_teacher.py")):
        if not os.path.exists(path):
            sys.exit(f"{path}: missing; run `python {hint}` first")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if args.max_mb is not None:
            corpus = os.path.join(tmp, "slice.jsonl")
            limit = int(args.max_mb * 1e6)
            with open(args.corpus, encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
                written = 0
                for line in src:
                    if written >= limit:
                        break
                    dst.write(line)
                    written += len(line.encode("utf-8"))
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"corpus: {corpus}, {len(texts)} documents, {text_mb:.1f} MB of text, {os.cpu_count()} cores")

        for workers in args.workers:
            # The baseline is measured right before each run, so a change in machine load hits both alike.
            seconds, tokens = bare_tokenizer_throughput(args.tokenizer, texts)
            limit_tps = tokens / seconds
            print(
                f"bare tokenizer encode_batch: {tokens} tokens in {seconds:.1f} s = {limit_tps:,.0f} tokens/s, "
                f"{text_mb / seconds:.2f} MB/s"
            )
            wall, processing, tool_tokens = run_tool(corpus, args.tokenizer, workers, os.path.join(tmp, f"w{workers}"))
            assert tool_tokens == tokens, f"tool wrote {tool_tokens} tokens, tokenizer gave {tokens}"
            print(
                f"preprocess_data.py --workers {workers}: {tokens / processing:,.0f} tokens/s, "
                f"{text_mb / processing:.2f} MB/s ({processing:.1f} s processing, {wall:.1f} s wall) -> "
                f"{tokens / processing / limit_tps:.2f}x of the bare tokenizer "
                f"({tokens / wall / limit_tps:.2f}x counting start-up)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
