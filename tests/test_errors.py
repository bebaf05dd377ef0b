"""The error contract of every command-line tool, driven as a user drives it: a subprocess per bad input.

Each case asserts: a non-zero exit, exactly one ``error:`` line on stderr that names the flag or file at
fault, no traceback, every input byte-identical afterwards, and nothing new (or changed) where the case's
output would have gone. README's "Error contract" table is the prose of this file.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_jsonl
from tests.training_utils import base_env, build_workspace, file_sha256

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass
class Case:
    """One bad invocation: ``argv`` after the script, the words the error line must contain, where output
    would go (checked unchanged), and files to create first (``setup(case_dir)``)."""

    script: str
    argv: list[str]
    needles: tuple[str, ...]
    outputs: list[str] = field(default_factory=list)
    setup: object = None


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (a file: itself); {} when absent."""
    if root.is_file():
        return {".": file_sha256(root)}
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, hf_tokenizer_dir, corpus_texts) -> Path:
    """The shared, read-only inputs: a tiny teacher, sub-networks, an indexed dataset, ds_configs, a corpus,
    a tokenizer; plus bad variants of some of them."""
    root = build_workspace(tmp_path_factory.mktemp("errors"))
    shutil.copytree(hf_tokenizer_dir, root / "tokenizer")
    write_jsonl(root / "corpus.jsonl", [{"text": t} for t in corpus_texts[:50]])
    with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:50]))
    truncated = (root / "corpus.jsonl.gz").read_bytes()
    (root / "truncated.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    (root / "mislabelled.jsonl.gz").write_text(json.dumps({"text": "plain text, not gzip"}) + "\n")
    (root / "zero7.json").write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    (root / "string_batch.json").write_text(json.dumps({"train_batch_size": "4"}))
    (root / "not_json.json").write_text("{stage: 1")
    subnet = json.loads((root / "subnet.json").read_text())
    (root / "bool_subnet.json").write_text(json.dumps({**subnet, "layers": [True, 2]}))
    (root / "float_counts.json").write_text(json.dumps({"num_layers": 2.5, "hidden_size": 32}))
    config = json.loads((root / "student_config.json").read_text())
    del config["norm_eps"]
    (root / "no_norm_eps.json").write_text(json.dumps(config))
    bad_teacher = root / "bad_eps_teacher"
    shutil.copytree(root / "teacher", bad_teacher)
    teacher_config = json.loads((bad_teacher / "model_config.json").read_text())
    (bad_teacher / "model_config.json").write_text(json.dumps({**teacher_config, "norm_eps": -1e-5}))
    from megatron_subnet.data.indexed import IndexedDatasetBuilder

    with IndexedDatasetBuilder(root / "big_ids", np.uint16) as builder:
        builder.add_document(np.array([1, 2, 500, 3], dtype=np.uint16))  # 500 >= the teacher's 128
    shutil.copy(root / "data.bin", root / "badptr.bin")
    idx = bytearray((root / "data.idx").read_bytes())
    header, count = 9 + 8 + 1 + 8 + 8, 300  # magic, version, dtype code, sequence and document counts
    pointers = header + 4 * count
    idx[pointers + 8 : pointers + 16] = np.int64(10**9).tobytes()  # sequence 1 points far past the .bin
    (root / "badptr.idx").write_bytes(bytes(idx))
    return root


def pretrain(ws: Path, *extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    flags = {
        "--ds_config": f"{ws}/zero0.json", "--teacher-load": f"{ws}/teacher", "--subnet": f"{ws}/subnet.json",
        "--data-path": f"{ws}/data", "--micro-batch-size": "1", "--global-batch-size": "4", "--seq-length": "32",
        "--train-iters": "2", "--split": "80,10,10",
    }  # fmt: skip
    argv = [x for k, v in flags.items() if k not in drop for x in (k, v)]
    return argv + list(extra)


def bad_shards(ws: Path):
    """A setup writing three broken sharded copies of the teacher into a case's directory: ``mixed`` (its TP
    rank 1 file from another save of the same shape), ``tp_missing`` (TP=2, rank 1's file gone) and
    ``pp_missing`` (PP=2, the last stage's file gone)."""

    def setup(d: Path) -> None:
        from megatron_subnet.model.weights import load_checkpoint, save_checkpoint

        config, state = load_checkpoint(ws / "teacher")
        save_checkpoint(d / "mixed", config, state, tensor_parallel_size=2)
        save_checkpoint(d / "other", config, {k: v * 2 for k, v in state.items()}, tensor_parallel_size=2)
        shutil.copy(d / "other" / "mp_rank_01.safetensors", d / "mixed" / "mp_rank_01.safetensors")
        save_checkpoint(d / "tp_missing", config, state, tensor_parallel_size=2)
        (d / "tp_missing" / "mp_rank_01.safetensors").unlink()
        save_checkpoint(d / "pp_missing", config, state, pipeline_parallel_size=2)
        (d / "pp_missing" / "mp_rank_00_001.safetensors").unlink()

    return setup


def cases(ws: Path) -> dict[str, Case]:
    W = str(ws)
    pt = "pretrain_slm.py"
    pre = "tools/preprocess_data.py"
    conv = "tools/convert_checkpoint.py"
    ev = "tools/evaluate.py"
    imp = "tools/compute_importance.py"
    srch = "tools/search_subnet.py"
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", f"{W}/tokenizer"]
    eval_data = ["--data-path", f"{W}/data", "--split", "80,10,10", "--seq-length", "16", "--micro-batch-size", "1"]
    shard_readers = [  # (name, script, argv of the broken copy's kind, outputs)
        ("reshard", conv, lambda k: ["reshard", "--input", f"{{out}}/{k}", "--output", "{out}/res",
                                     "--tensor-model-parallel-size", "1"], ["res"]),
        ("evaluate", ev, lambda k: ["--load", f"{{out}}/{k}", *eval_data], []),
        ("pretrain teacher", pt, lambda k: pretrain(ws, "--teacher-load", f"{{out}}/{k}", "--save", "{out}/s"), ["s"]),
    ]
    search_base = ["--load", f"{W}/teacher", "--data-path", f"{W}/data", "--split", "80,10,10", "--seq-length", "16",
                   "--target-params", "0.5"]  # fmt: skip

    def existing_dir(name: str):
        return lambda d: ((d / name).mkdir(), (d / name / "keep.txt").write_text("mine"))

    def existing_file(name: str, text: str = "mine"):
        return lambda d: (d / name).write_text(text)

    def existing_dataset(d: Path) -> None:
        for ext in ("bin", "idx"):
            shutil.copy(ws / f"data.{ext}", d / f"out_text_document.{ext}")

    return {
        # pretrain_slm.py: flags
        "pretrain nan temperature": Case(pt, pretrain(ws, "--kd-temperature", "nan"), ("--kd-temperature", "nan")),
        # shards that do not belong together: refused by every reader, naming the file
        **{f"{tool} {kind}": Case(script, argv(kind), needles, outputs, bad_shards(ws))
           for tool, script, argv, outputs in shard_readers
           for kind, needles in (("mixed", ("mp_rank_01.safetensors", "another checkpoint")),
                                 ("tp_missing", ("missing mp_rank_01.safetensors",)),
                                 ("pp_missing", ("missing mp_rank_00_001.safetensors",)))},  # fmt: skip
        "pretrain nccl without cuda": Case(pt, pretrain(ws, "--distributed-backend", "nccl"),
                                           ("--distributed-backend nccl", "CUDA")),
        "pretrain corrupt checkpoint metadata": Case(
            pt, pretrain(ws, "--load", "{out}/ckpt"), ("--load", "megatron_subnet.json", "corrupt"), ["ckpt"],
            lambda d: ((d / "ckpt" / "iter_0000001").mkdir(parents=True), (d / "ckpt" / "latest").write_text(
                "iter_0000001"), (d / "ckpt" / "iter_0000001" / "megatron_subnet.json").write_text('{"iteration": 1,')),
        ),  # fmt: skip
        # T^2 overflows fp32 (a NaN loss), or distillation contributes nothing: outside the stable range
        "pretrain huge temperature": Case(pt, pretrain(ws, "--kd-temperature", "1e30"),
                                          ("--kd-temperature 1e+30", "[0.1, 100.0]")),
        "pretrain tiny temperature": Case(pt, pretrain(ws, "--kd-temperature", "1e-30"),
                                          ("--kd-temperature 1e-30", "[0.1, 100.0]")),
        "pretrain zero iters": Case(pt, pretrain(ws, "--train-iters", "0"), ("--train-iters",)),
        "pretrain negative global batch": Case(pt, pretrain(ws, "--global-batch-size", "-4"), ("--global-batch-size",)),
        "pretrain infinite lr": Case(pt, pretrain(ws, "--lr", "inf"), ("--lr", "inf")),
        "pretrain zero peak": Case(pt, pretrain(ws, "--peak-tflops", "0"), ("--peak-tflops", "0")),
        "pretrain nan peak": Case(pt, pretrain(ws, "--peak-tflops", "nan"), ("--peak-tflops", "nan")),
        "pretrain unknown recompute": Case(
            pt, pretrain(ws, "--recompute-granularity", "block"), ("--recompute-granularity",)
        ),
        "pretrain teacher dtype fp16": Case(pt, pretrain(ws, "--teacher-dtype", "fp16"), ("--teacher-dtype",)),
        "pretrain beta1 out of range": Case(pt, pretrain(ws, "--adam-beta1", "1.5"), ("--adam-beta1",)),
        "pretrain missing teacher": Case(pt, pretrain(ws, "--teacher-load", f"{W}/nope"), ("--teacher-load",)),
        # pretrain_slm.py: ds_config, before any weights or data are read
        "pretrain zero stage 7": Case(pt, pretrain(ws, "--ds_config", f"{W}/zero7.json"), ("zero7.json", "stage")),
        "pretrain string batch": Case(
            pt, pretrain(ws, "--ds_config", f"{W}/string_batch.json"), ("string_batch.json", "train_batch_size")
        ),
        "pretrain ds_config not json": Case(pt, pretrain(ws, "--ds_config", f"{W}/not_json.json"), ("not_json.json",)),
        # pretrain_slm.py: configs and data
        "pretrain boolean subnet": Case(
            pt, pretrain(ws, "--subnet", f"{W}/bool_subnet.json"), ("bool_subnet.json", "layers")
        ),
        "pretrain float counts": Case(
            pt, pretrain(ws, "--subnet", f"{W}/float_counts.json"), ("float_counts.json", "num_layers")
        ),
        "pretrain config without norm_eps": Case(
            pt,
            pretrain(ws, "--init", "random", "--model-config", f"{W}/no_norm_eps.json", "--kd-alpha", "0",
                     drop=("--teacher-load", "--subnet")),
            ("no_norm_eps.json", "norm_eps"),
        ),  # fmt: skip
        "pretrain sequence too long": Case(pt, pretrain(ws, "--seq-length", "4096"), ("--seq-length", "4096")),
        "pretrain ids outside vocab": Case(pt, pretrain(ws, "--data-path", f"{W}/big_ids"), ("big_ids", "500")),
        "pretrain corrupt idx": Case(pt, pretrain(ws, "--data-path", f"{W}/badptr"), ("badptr.idx",)),
        # pretrain_slm.py: outputs
        "pretrain save is a file": Case(
            pt, pretrain(ws, "--save", "{out}/ckpt"), ("--save",), ["ckpt"], existing_file("ckpt")
        ),
        "pretrain read-only log dir": Case(pt, pretrain(ws, "--log-dir", "/proc/megatron_subnet_logs"), ("--log-dir",)),
        # preprocess_data.py
        "preprocess zero documents": Case(
            pre, ["--input", f"{W}/corpus.jsonl", "--json-keys", "txt", "--output-prefix", "{out}/out", *tok,
                  "--overwrite"],
            ("0 documents",), ["."], existing_dataset,
        ),  # fmt: skip
        "preprocess existing output": Case(
            pre, ["--input", f"{W}/corpus.jsonl", "--output-prefix", "{out}/out", *tok],
            ("--output-prefix", "--overwrite"), ["."], existing_dataset,
        ),  # fmt: skip
        "preprocess truncated gz": Case(
            pre, ["--input", f"{W}/truncated.jsonl.gz", "--output-prefix", "{out}/out", *tok],
            ("truncated.jsonl.gz",), ["."],
        ),  # fmt: skip
        "preprocess mislabelled gz": Case(
            pre, ["--input", f"{W}/mislabelled.jsonl.gz", "--output-prefix", "{out}/out", *tok],
            ("mislabelled.jsonl.gz",), ["."],
        ),  # fmt: skip
        "preprocess zero workers": Case(
            pre, ["--input", f"{W}/corpus.jsonl", "--output-prefix", "{out}/out", *tok, "--workers", "0"],
            ("--workers",), ["."],
        ),  # fmt: skip
        "preprocess missing input": Case(
            pre, ["--input", f"{W}/nope.jsonl", "--output-prefix", "{out}/out", *tok], ("--input", "nope.jsonl"), ["."]
        ),
        "preprocess missing tokenizer": Case(
            pre, ["--input", f"{W}/corpus.jsonl", "--output-prefix", "{out}/out", "--tokenizer-type",
                  "HuggingFaceTokenizer", "--tokenizer-model", f"{W}/nope"],
            ("--tokenizer-model",), ["."],
        ),  # fmt: skip
        "preprocess unwritable output": Case(
            pre, ["--input", f"{W}/corpus.jsonl", "--output-prefix", "/proc/megatron_subnet/out", *tok],
            ("--output-prefix",),
        ),  # fmt: skip
        # convert_checkpoint.py
        "convert extract over its input's parent": Case(
            conv, ["extract", "--input", "{out}/parent/teacher", "--subnet", f"{W}/subnet.json", "--output",
                   "{out}/parent", "--overwrite"],
            ("--output", "--input"), ["parent"], lambda d: shutil.copytree(ws / "teacher", d / "parent" / "teacher"),
        ),  # fmt: skip
        "convert import missing input": Case(
            conv, ["import", "--input", f"{W}/nope", "--output", "{out}/hf"], ("--input", "nope"), ["hf"]
        ),
        "convert export to a file": Case(
            conv, ["export", "--input", f"{W}/teacher", "--output", "{out}/hf"], ("--output",), ["hf"],
            existing_file("hf"),
        ),  # fmt: skip
        "convert export over a full dir": Case(
            conv, ["export", "--input", f"{W}/teacher", "--output", "{out}/hf"], ("--output", "--overwrite"), ["hf"],
            existing_dir("hf"),
        ),  # fmt: skip
        "convert extract boolean subnet": Case(
            conv, ["extract", "--input", f"{W}/teacher", "--subnet", f"{W}/bool_subnet.json", "--output",
                   "{out}/student"],
            ("bool_subnet.json",), ["student"],
        ),  # fmt: skip
        "convert negative norm_eps": Case(
            conv, ["export", "--input", f"{W}/bad_eps_teacher", "--output", "{out}/hf"], ("norm_eps",), ["hf"]
        ),
        # evaluate.py
        "evaluate cuda without cuda": Case(
            ev, ["--load", f"{W}/teacher", *eval_data, "--device", "cuda"], ("--device", "cuda")
        ),
        "evaluate sequence too long": Case(ev, ["--load", f"{W}/teacher", *eval_data, "--seq-length", "4096"],
                                           ("--seq-length", "4096")),  # fmt: skip
        "evaluate output is a dir": Case(
            ev, ["--load", f"{W}/teacher", *eval_data, "--output", "{out}/res"], ("--output",), ["res"],
            existing_dir("res"),
        ),  # fmt: skip
        "evaluate zero iters": Case(ev, ["--load", f"{W}/teacher", *eval_data, "--eval-iters", "0"], ("--eval-iters",)),
        "evaluate missing load": Case(ev, ["--load", f"{W}/nope", *eval_data], ("nope",)),
        "evaluate ids outside vocab": Case(
            ev, ["--load", f"{W}/teacher", *eval_data, "--data-path", f"{W}/big_ids", "--split", "1,1,0"],
            ("--data-path",),
        ),  # fmt: skip
        "evaluate nan eps config": Case(ev, ["--load", f"{W}/bad_eps_teacher", *eval_data], ("norm_eps",)),
        # compute_importance.py
        "importance existing output": Case(
            imp, ["--load", f"{W}/teacher", *eval_data, "--output", "{out}/imp.safetensors"],
            ("--output", "--overwrite"), ["imp.safetensors"], existing_file("imp.safetensors"),
        ),  # fmt: skip
        "importance output inside load": Case(
            imp, ["--load", "{out}/teacher", *eval_data, "--output", "{out}/teacher/imp.safetensors"],
            ("--output", "--load"), ["teacher"], lambda d: shutil.copytree(ws / "teacher", d / "teacher"),
        ),  # fmt: skip
        "importance negative calib": Case(
            imp, ["--load", f"{W}/teacher", *eval_data, "--calib-iters", "-1", "--output", "{out}/i.safetensors"],
            ("--calib-iters",), ["."],
        ),  # fmt: skip
        # search_subnet.py
        "search infinite target": Case(
            srch, [*search_base, "--target-params", "inf", "--output", "{out}/s"], ("--target-params", "inf"), ["."]
        ),
        "search mutation prob 2": Case(
            srch, [*search_base, "--mutation-prob", "2", "--output", "{out}/s"], ("--mutation-prob",), ["."]
        ),
        "search output is a file": Case(
            srch, [*search_base, "--output", "{out}/s"], ("--output",), ["s"], existing_file("s")
        ),
        "search missing importance": Case(
            srch, [*search_base, "--importance", f"{W}/nope.safetensors", "--output", "{out}/s"],
            ("--importance",), ["."],
        ),  # fmt: skip
        "search cuda without cuda": Case(
            srch, [*search_base, "--device", "cuda", "--output", "{out}/s"], ("--device",), ["."]
        ),
        # train_tokenizer.py
        "tokenizer nan coverage": Case(
            "tools/train_tokenizer.py", ["--input", f"{W}/corpus.jsonl", "--model-prefix", "{out}/spm",
                                         "--character-coverage", "nan"],
            ("--character-coverage",), ["."],
        ),  # fmt: skip
        "tokenizer existing model": Case(
            "tools/train_tokenizer.py", ["--input", f"{W}/corpus.jsonl", "--model-prefix", "{out}/spm",
                                         "--vocab-size", "100"],
            ("--model-prefix", "--overwrite"), ["."], existing_file("spm.model"),
        ),  # fmt: skip
        # fetch tools: their outputs are caches, but never somebody else's directory
        "fetch teacher over a full dir": Case(
            "tools/fetch_teacher.py", ["--output", "{out}/mine", "--tokenizer-only"], ("--output", "--overwrite"),
            ["mine"], existing_dir("mine"),
        ),  # fmt: skip
        "fetch teacher output is a file": Case(
            "tools/fetch_teacher.py", ["--output", "{out}/t", "--tokenizer-only"], ("--output",), ["t"],
            existing_file("t"),
        ),  # fmt: skip
        "fetch corpus output is a dir": Case(
            "tools/fetch_demo_corpus.py", ["--output", "{out}/c"], ("--output",), ["c"], existing_dir("c")
        ),
    }


def run_case(name: str, case: Case, case_dir: Path) -> tuple[str, subprocess.CompletedProcess, dict, dict]:
    case_dir.mkdir(parents=True)
    if case.setup is not None:
        case.setup(case_dir)
    argv = [a.replace("{out}", str(case_dir)) for a in case.argv]
    before = {o: tree(case_dir / o) for o in case.outputs}
    proc = subprocess.run(
        [PYTHON, str(REPO / case.script), *argv], cwd=case_dir, env=base_env(), capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    after = {o: tree(case_dir / o) for o in case.outputs}
    return name, proc, before, after


@pytest.mark.slow
def test_every_tool_gives_one_line_and_loses_nothing(ws, tmp_path):
    """At least 40 bad inputs over every CLI; all run two at a time."""
    table = cases(ws)
    assert len(table) >= 40
    inputs_before = tree(ws)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda item: run_case(*item, tmp_path / item[0].replace(" ", "_")), table.items()))
    failures = []
    for name, proc, before, after in results:
        case = table[name]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        problems = []
        if proc.returncode in (0, None):
            problems.append(f"exit {proc.returncode}")
        if "Traceback" in proc.stderr:
            problems.append("traceback")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif missing := [n for n in case.needles if n not in errors[0]]:
            problems.append(f"error line lacks {missing}")
        if before != after:
            problems.append(f"output location changed: {before} -> {after}")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n    stderr: {proc.stderr[-600:]!r}")
    assert tree(ws) == inputs_before, "an input changed"
    assert not failures, "\n".join(failures)
