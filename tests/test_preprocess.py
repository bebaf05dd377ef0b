"""tools/preprocess_data.py: contents, determinism across workers, bad input, atomic outputs."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
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
