"""tools/preprocess_data.py: contents, determinism across workers, bad input, atomic outputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

from megatron_subnet.data.indexed import IndexedDataset
from megatron_subnet.data.tokenizer import build_tokenizer
from tools.preprocess_data import main

ROOT = Path(__file__).resolve().parents[1]


def hf_args(tokenizer_dir, inputs, prefix, *extra):
    return [
        "--input",
        *map(str, inputs),
        "--output-prefix",
        str(prefix),
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tokenizer_dir),
        *extra,
    ]


def files_of(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_every_key_holds_the_tokenized_documents(tmp_path, hf_tokenizer_dir, corpus_texts):
    records = [{"text": t, "title": t[:12]} for t in corpus_texts[:50]]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert (
        main(hf_args(hf_tokenizer_dir, [src], tmp_path / "out" / "c", "--json-keys", "text", "title", "--append-eod"))
        == 0
    )
    tok = build_tokenizer("HuggingFaceTokenizer", str(hf_tokenizer_dir))
    for key in ("text", "title"):
        ds = IndexedDataset(tmp_path / "out" / f"c_{key}_document")
        assert ds.dtype == np.uint16 and len(ds) == len(records)
        for i, r in enumerate(records):
            assert ds[i].tolist() == tok.tokenize(r[key]) + [tok.eod]


def test_workers_give_byte_identical_output(tmp_path, hf_tokenizer_dir, corpus_texts):
    texts = corpus_texts * 3  # > several batches, so ordering across workers matters
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:500]])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[500:])
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        assert (
            main(hf_args(hf_tokenizer_dir, [tmp_path / "*.jsonl*"], prefix, "--workers", str(workers), "--append-eod"))
            == 0
        )
        outputs[workers] = [Path(f"{prefix}_text_document.{ext}").read_bytes() for ext in ("bin", "idx")]
    assert outputs[1] == outputs[2]
    assert len(IndexedDataset(tmp_path / "w2_text_document")) == len(texts)


def test_sentencepiece_and_null_tokenizers(tmp_path, spm_model):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the parent model and the student."}, {"text": "3 4 5"}])
    assert (
        main(
            [
                "--input",
                str(src),
                "--output-prefix",
                str(tmp_path / "sp"),
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                str(spm_model),
                "--append-eod",
            ]
        )
        == 0
    )
    sp = build_tokenizer("SentencePieceTokenizer", str(spm_model))
    ds = IndexedDataset(tmp_path / "sp_text_document")
    assert sp.detokenize(ds[0][:-1].tolist()) == "the parent model and the student."
    assert ds[0][-1] == sp.eod == 3

    src = write_jsonl(tmp_path / "ids.jsonl", [{"text": "3 4 5"}, {"text": "70000"}])
    assert (
        main(
            [
                "--input",
                str(src),
                "--output-prefix",
                str(tmp_path / "null"),
                "--tokenizer-type",
                "NullTokenizer",
                "--vocab-size",
                "100000",
            ]
        )
        == 0
    )
    ds = IndexedDataset(tmp_path / "null_text_document")
    assert ds.dtype == np.int32 and ds[1].tolist() == [70000]


def test_bad_lines_are_skipped_counted_and_reported(tmp_path, hf_tokenizer_dir, capsys):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"text": "good one"},
            "{not json",
            {"body": "no text key"},
            {"text": 42},
            "[1, 2]",
            {"text": "good two"},
        ],
    )
    assert main(hf_args(hf_tokenizer_dir, [src], tmp_path / "o")) == 0
    out, err = capsys.readouterr()
    assert f"{src}:2: not JSON" in err
    assert f"{src}:3: missing key ('text')" in err
    assert f"{src}:4: non-string value ('text' is int)" in err
    assert f"{src}:5: not JSON" in err
    assert "documents: 2," in out and "skipped lines: 4 (missing key: 1, non-string value: 1, not JSON: 2)" in out
    assert len(IndexedDataset(tmp_path / "o_text_document")) == 2


def test_strict_stops_at_the_first_bad_line_and_writes_nothing(tmp_path, hf_tokenizer_dir, corpus_texts, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_texts[:300]] + ["{oops"])
    (tmp_path / "out").mkdir()
    code = main(hf_args(hf_tokenizer_dir, [src], tmp_path / "out" / "o", "--strict", "--workers", "2"))
    assert code != 0
    assert f"{src}:301: not JSON" in capsys.readouterr().err
    assert files_of(tmp_path / "out") == []  # temporary files removed, no pair that looks finished


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--input": "missing.jsonl"}, "--input missing.jsonl: not a readable file"),
        ({"--input": "nomatch*.jsonl"}, "--input nomatch*.jsonl: no file matches"),
        ({"--tokenizer-type": "GPT5Tokenizer"}, "--tokenizer-type GPT5Tokenizer: unknown"),
        ({"--tokenizer-model": "no_such_dir"}, "--tokenizer-model no_such_dir: no such file or directory"),
        ({"--tokenizer-model": "in.jsonl"}, "--tokenizer-model in.jsonl: expected a directory"),
        ({"--tokenizer-model": "."}, "--tokenizer-model .: not a Hugging Face tokenizer"),
    ],
)
def test_bad_arguments_give_one_clear_line(tmp_path, hf_tokenizer_dir, change, message):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    args = {
        "--input": "in.jsonl",
        "--output-prefix": "out/o",
        "--tokenizer-type": "HuggingFaceTokenizer",
        "--tokenizer-model": str(hf_tokenizer_dir),
    } | change
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py")] + [x for kv in args.items() for x in kv]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() or files_of(tmp_path / "out") == []


# ----------------------------------------------------------------------------- issue 8: nothing lost, nothing wrong


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (hidden ones included), by path."""
    found = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def one_error(code: int, err: str, *needles: str) -> str:
    """The run failed with exactly one non-blank stderr line, an ``error:`` line holding every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_tool(script: str, args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_zero_documents_is_an_error_and_keeps_existing_outputs(tmp_path, hf_tokenizer_dir):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello there"}])
    (tmp_path / "out").mkdir()
    assert main(hf_args(hf_tokenizer_dir, [good], tmp_path / "out" / "o")) == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "no text key"}, {"body": "nor here"}, "", "{oops"])
    before = snapshot(tmp_path)
    result = run_tool("preprocess_data.py", hf_args(hf_tokenizer_dir, [bad], tmp_path / "out" / "o", "--overwrite",
                                                     "--workers", "2"), tmp_path)
    one_error(result.returncode, result.stderr, "0 documents", str(bad), "missing key: 2, not JSON: 1",
              f"{bad}:1: missing key ('text')", f"{bad}:4: not JSON")
    assert snapshot(tmp_path) == before  # the earlier outputs are byte-identical, no temporaries left

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = run_tool("preprocess_data.py", hf_args(hf_tokenizer_dir, [empty], tmp_path / "new"), tmp_path)
    one_error(result.returncode, result.stderr, "0 documents", "no non-blank lines")
    assert not list(tmp_path.glob("*new*"))


def test_many_skipped_lines_give_one_warning(tmp_path, hf_tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"body": "x"}, {"text": "two"}, {"text": "three"}])
    assert main(hf_args(hf_tokenizer_dir, [src], tmp_path / "a")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "skipped 1 of 4 non-blank lines (25%" in warnings[0] and f"{src}:2: missing key" in warnings[0]
    assert main(hf_args(hf_tokenizer_dir, [src], tmp_path / "b", "--warn-skipped-percent", "25")) == 0
    assert "warning:" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(hf_args(hf_tokenizer_dir, [src], tmp_path / "c", "--warn-skipped-percent", "nan"))
    assert "--warn-skipped-percent" in capsys.readouterr().err


def test_existing_outputs_are_replaced_only_with_overwrite(tmp_path, hf_tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "first version"}])
    assert main(hf_args(hf_tokenizer_dir, [src], tmp_path / "o")) == 0
    capsys.readouterr()
    # --strict with a bad line: had the tool started tokenizing, the error would be about that line
    write_jsonl(src, [{"text": "second version, longer"}, "{bad"])
    before = snapshot(tmp_path)
    code = main(hf_args(hf_tokenizer_dir, [src], tmp_path / "o", "--strict"))
    one_error(code, capsys.readouterr().err, "--output-prefix", "o_text_document.bin", "--overwrite")
    assert snapshot(tmp_path) == before

    write_jsonl(src, [{"text": "second version, longer"}])
    assert main(hf_args(hf_tokenizer_dir, [src], tmp_path / "o", "--overwrite")) == 0
    tok = build_tokenizer("HuggingFaceTokenizer", str(hf_tokenizer_dir))
    assert IndexedDataset(tmp_path / "o_text_document")[0].tolist() == tok.tokenize("second version, longer")


def test_output_may_not_be_an_input_nor_go_where_it_cannot(tmp_path, hf_tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "o_text_document.bin", [{"text": "an input named like the output"}])
    before = snapshot(tmp_path)
    code = main(hf_args(hf_tokenizer_dir, [src], tmp_path / "o", "--overwrite"))
    one_error(code, capsys.readouterr().err, "--output-prefix", "is the input --input", str(src))
    assert snapshot(tmp_path) == before
    (tmp_path / "afile").write_text("not a directory")
    before = snapshot(tmp_path)
    code = main(hf_args(hf_tokenizer_dir, [src], tmp_path / "afile" / "o"))
    one_error(code, capsys.readouterr().err, "--output-prefix", "afile", "not a directory")
    assert snapshot(tmp_path) == before


def test_unwritable_output_directory_is_named(tmp_path, hf_tokenizer_dir, capsys):
    """/proc refuses new files to root too (a 0o555 directory would not stop root)."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    code = main(hf_args(hf_tokenizer_dir, [src], Path("/proc") / "megatron_subnet_o"))
    one_error(code, capsys.readouterr().err, "--output-prefix", "cannot write")
    assert not list(Path("/proc").glob("*megatron_subnet_o*"))


def _gzip_lines(n: int) -> bytes:
    rng = np.random.default_rng(0)
    words = np.array("alpha beta gamma delta epsilon zeta eta theta".split())
    lines = (json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n" for _ in range(n))
    return gzip.compress("".join(lines).encode())


@pytest.mark.parametrize(
    "kind, message",
    [("not gzip", "named .gz but not gzip data"), ("truncated", "truncated gzip file"),
     ("corrupt", "gzip data"), ("gzip named .jsonl", "gzip-compressed data")],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_broken_gzip_input_is_named_and_nothing_written(tmp_path, hf_tokenizer_dir, capsys, kind, message, workers):
    data = _gzip_lines(3000)
    name = "in.jsonl" if kind == "gzip named .jsonl" else "in.jsonl.gz"
    if kind == "not gzip":
        data = b'{"text": "plain text"}\n'
    elif kind == "truncated":
        data = data[: len(data) * 2 // 3]
    elif kind == "corrupt":
        data = data[:200] + bytes(b ^ 0x55 for b in data[200:400]) + data[400:]
    src = tmp_path / "in" / name
    src.parent.mkdir()
    src.write_bytes(data)
    before = snapshot(tmp_path)
    code = main(hf_args(hf_tokenizer_dir, [src], tmp_path / "out" / "o", "--workers", workers))
    one_error(code, capsys.readouterr().err, f"--input {src}", message)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists() or files_of(tmp_path / "out") == []


def test_utf8_bom_is_stripped_and_invalid_utf8_is_a_bad_line(tmp_path, hf_tokenizer_dir, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "caf\xe9 latin-1"}\n{"text": "third \xc3\xa9"}\n')
    assert main(hf_args(hf_tokenizer_dir, [src], tmp_path / "o", "--warn-skipped-percent", "50")) == 0
    out, err = capsys.readouterr()
    tok = build_tokenizer("HuggingFaceTokenizer", str(hf_tokenizer_dir))
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize("first"), tok.tokenize("third \u00e9")]
    assert f"{src}:2: invalid UTF-8 (byte 0xe9 at byte 14 of the line)" in err
    assert "skipped lines: 1 (invalid UTF-8: 1)" in out

    code = main(hf_args(hf_tokenizer_dir, [src], tmp_path / "strict", "--strict"))
    one_error(code, capsys.readouterr().err, f"{src}:2: invalid UTF-8")
    assert not list(tmp_path.glob("*strict*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_run_are_removed(tmp_path, hf_tokenizer_dir, capsys):
    from megatron_subnet.outputs import temp_sibling

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    dead = _dead_pid()
    ours = temp_sibling(tmp_path / "o_text_document.bin").name.replace(f"-{os.getpid()}-", f"-{dead}-")
    leftovers = [ours, f"o_text_document.bin.tmp-{dead}", f"o_text_document.idx.tmp-{dead}"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half written")
    assert main(hf_args(hf_tokenizer_dir, [src], tmp_path / "o")) == 0
    assert files_of(tmp_path) == ["in.jsonl", "o_text_document.bin", "o_text_document.idx"]
    err = capsys.readouterr().err
    assert all(name in err for name in leftovers)


def _has_bytes(directory: Path) -> bool:
    """Some file in ``directory`` holds bytes (files may vanish while we look: the tool's write probe)."""
    for path in directory.iterdir():
        try:
            if path.stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass
    return False


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path, hf_tokenizer_dir, corpus_texts, workers):
    line = json.dumps({"text": " ".join(corpus_texts[:20])}) + "\n"
    src = tmp_path / "in.jsonl"
    src.write_text(line * 6000)  # ~20 MB: tens of seconds of tokenizing on a slow machine
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
           *hf_args(hf_tokenizer_dir, [src], tmp_path / "out" / "o", "--workers", workers)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's Ctrl-C reaches it
    try:
        deadline = time.time() + 120
        while not _has_bytes(tmp_path / "out"):  # tokens are being written
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    one_error(proc.returncode, err, "interrupted")
    assert files_of(tmp_path / "out") == []
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- tools/train_tokenizer.py


def test_train_tokenizer_replaces_outputs_only_with_overwrite(tmp_path, corpus_texts, spm_model, capsys):
    from tools.train_tokenizer import main as train

    corpus = tmp_path / "corpus.jsonl"
    # a byte-order mark and a line of invalid UTF-8 do not stop it
    corpus.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"text": t}).encode() + b"\n" for t in corpus_texts)
                       + b'{"text": "\xff"}\n')
    (tmp_path / "spm.model").write_bytes(b"precious")
    before = snapshot(tmp_path)
    code = train(["--input", str(corpus), "--model-prefix", str(tmp_path / "spm"), "--vocab-size", "320"])
    one_error(code, capsys.readouterr().err, "--model-prefix", "spm.model", "--overwrite")
    assert snapshot(tmp_path) == before
    args = ["--input", str(corpus), "--model-prefix", str(tmp_path / "spm"), "--vocab-size", "320", "--overwrite"]
    assert train(args) == 0
    # the same vocabulary as from the clean corpus: the BOM cost no document, the bad line added nothing
    assert (tmp_path / "spm.vocab").read_bytes() == spm_model.with_suffix(".vocab").read_bytes()
    assert files_of(tmp_path) == ["corpus.jsonl", "spm.model", "spm.vocab"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vocab-size", "0"], "argument --vocab-size"),
        (["--character-coverage", "0"], "argument --character-coverage"),
        (["--character-coverage", "nan"], "argument --character-coverage"),
        (["--character-coverage", "1.5"], "argument --character-coverage"),
        (["--character-coverage", "0.5"], "argument --character-coverage"),  # sentencepiece needs >= 0.98
        (["--json-key", "body"], "no usable document"),
        (["--input", "broken.jsonl.gz"], "--input broken.jsonl.gz (after line"),
        (["--model-prefix", "corpus.jsonl/spm"], "--model-prefix corpus.jsonl/spm.model"),
    ],
)
def test_train_tokenizer_bad_input_gives_one_line(tmp_path, corpus_texts, extra, message):
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in corpus_texts[:50]])
    (tmp_path / "broken.jsonl.gz").write_bytes(_gzip_lines(3000)[:-500])
    args = {"--input": "corpus.jsonl", "--model-prefix": "out/spm", "--vocab-size": "320"}
    args.update(zip(extra[::2], extra[1::2]))
    before = snapshot(tmp_path)
    result = run_tool("train_tokenizer.py", [x for kv in args.items() for x in kv], tmp_path)
    one_error(result.returncode, result.stderr, message)
    assert snapshot(tmp_path) == before


def _sleep_forever() -> None:
    time.sleep(3600)


def test_stop_pool_kills_the_workers_when_terminate_blocks():
    """A terminate that never returns (CPython's can block on a worker mid-way through a large result) costs
    the timeout, not the run: the worker processes are killed and stop_pool returns."""
    import multiprocessing
    import threading

    from tools.preprocess_data import stop_pool

    class BlockedPool:
        def terminate(self) -> None:
            threading.Event().wait()

    worker = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
    worker.start()
    start = time.time()
    stop_pool(BlockedPool(), timeout=0.5)
    assert time.time() - start < 30
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
