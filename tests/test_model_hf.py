"""Hugging Face in and out: logit parity with transformers, exact round trips, tools/convert_checkpoint.py.

Every model here is tiny and built locally (no download).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_subnet.model.config import ConfigError, ModelConfig
from megatron_subnet.model.extract import extract_state_dict
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.hf import config_from_hf, config_to_hf, load_hf, save_hf, state_from_hf
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import CheckpointError, load_checkpoint, save_checkpoint
from tests.tiny_models import tiny
from tools.convert_checkpoint import main as convert_main

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
VOCAB = 320  # >= the test tokenizer's vocabulary (conftest.hf_tokenizer_dir)


def hf_config(kind: str, vocab: int = VOCAB):
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab, num_hidden_layers=2, intermediate_size=56, initializer_range=0.15, max_position_embeddings=64
    )
    if kind == "llama":  # grouped-query attention, untied, head_dim (12) != hidden / heads (8)
        return LlamaConfig(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=12,
            tie_word_embeddings=False,
            rope_theta=500.0,
            **common,
        )
    if kind == "qwen2":  # q/k/v bias, tied embeddings
        return Qwen2Config(
            hidden_size=48, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common
        )
    if kind in ("gpt_neox", "gpt_neox_sequential"):  # partial rotary, (non-)parallel residual, every bias
        return GPTNeoXConfig(
            hidden_size=64,
            num_attention_heads=4,
            rotary_pct=0.25,
            tie_word_embeddings=False,
            use_parallel_residual=kind == "gpt_neox",
            hidden_act="gelu",
            **common,
        )
    raise ValueError(kind)


def hf_model(kind: str, seed: int = 0, vocab: int = VOCAB):
    """A transformers model with large random weights and random norms and biases (nothing left at 0 or 1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, vocab), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def our_model(config: ModelConfig, state: dict) -> GPTModel:
    model = GPTModel(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def token_batch(vocab: int = VOCAB, seed: int = 0, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= tol, f"max abs logit difference {diff}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert theirs.std() > 0.5, "logits too flat for a meaningful comparison"


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


# --- logit parity and round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_neox", "gpt_neox_sequential"])
def test_logits_match_transformers(kind):
    hf = hf_model(kind)
    config = config_from_hf(hf.config)
    expected = {
        "llama": ("llama", 2, 1.0, False, False),
        "qwen2": ("llama", 2, 1.0, True, True),
        "gpt_neox": ("gpt_neox", 4, 0.25, False, True),
        "gpt_neox_sequential": ("gpt_neox", 4, 0.25, False, True),
    }[kind]
    assert (
        config.arch,
        config.num_query_groups,
        config.rotary_pct,
        config.tie_word_embeddings,
        config.qkv_bias,
    ) == expected
    assert config.parallel_residual == (kind == "gpt_neox")
    model = our_model(config, state_from_hf(config, hf.state_dict(), kind))
    x = token_batch()
    with torch.no_grad():
        assert_logits_match(model(x), hf(x).logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_neox"])
def test_round_trip_through_our_format_is_identical(tmp_path, kind):
    from transformers import AutoConfig

    hf_model(kind).save_pretrained(tmp_path / "hf")
    config, state = load_hf(tmp_path / "hf")
    save_checkpoint(tmp_path / "ckpt", config, state)
    config2, state2 = load_checkpoint(tmp_path / "ckpt")
    assert config2 == config
    save_hf(tmp_path / "out", config2, state2)
    before, after = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    c_in, c_out = AutoConfig.from_pretrained(tmp_path / "hf"), AutoConfig.from_pretrained(tmp_path / "out")
    assert config_from_hf(c_in) == config_from_hf(c_out)
    assert c_in.model_type == c_out.model_type


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(**tiny(
            "llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=1,
            head_dim=16, ffn_hidden_size=40, tie_word_embeddings=True, init_std=0.15, eos_token_id=0,
        )),
        ModelConfig(**tiny(
            "gpt_neox", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=4,
            head_dim=8, ffn_hidden_size=40, activation="gelu_tanh", rotary_pct=0.5, init_std=0.15,
        )),
    ],
    ids=["llama", "gpt_neox"],
)
def test_exported_directory_loads_with_transformers(tmp_path, hf_tokenizer_dir, config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = GPTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    save_hf(tmp_path / "hf", config, model.state_dict(), tokenizer_from=hf_tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    reference = AutoTokenizer.from_pretrained(hf_tokenizer_dir, local_files_only=True)
    texts = ("the student model of the teacher", "parallel tensor shard index of a batch")
    ids = [tok(t)["input_ids"] for t in texts]
    assert ids == [reference(t)["input_ids"] for t in texts] and len(tok) <= VOCAB
    n = min(map(len, ids))
    x = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        assert_logits_match(model(x), hf(x).logits)
        assert_logits_match(model(token_batch()), hf(token_batch()).logits)


def test_config_to_hf_refuses_what_hugging_face_cannot_express():
    base = dict(vocab_size=64, hidden_size=16, num_layers=2, head_dim=4, ffn_hidden_size=24)
    with pytest.raises(ConfigError, match="per-layer sizes"):
        config_to_hf(ModelConfig(num_attention_heads=[4, 2], num_query_groups=[2, 1], **base))
    with pytest.raises(ConfigError, match="partial rotary"):
        config_to_hf(ModelConfig(num_attention_heads=4, num_query_groups=2, rotary_pct=0.5, **base))
    with pytest.raises(ConfigError, match="grouped-query"):
        config_to_hf(
            ModelConfig(
                arch="gpt_neox",
                num_attention_heads=4,
                num_query_groups=2,
                normalization="layernorm",
                activation="gelu",
                qkv_bias=True,
                proj_bias=True,
                mlp_bias=True,
                **base,
            )
        )
    with pytest.raises(ConfigError, match=r"hidden_size \(18\) to be a multiple of num_attention_heads \(4\)"):
        config_to_hf(ModelConfig(num_attention_heads=4, num_query_groups=2, **{**base, "hidden_size": 18}))
    qwen2 = config_to_hf(ModelConfig(num_attention_heads=4, num_query_groups=2, qkv_bias=True, **base))
    assert type(qwen2).__name__ == "Qwen2Config" and qwen2.head_dim == 4


def test_load_hf_names_what_does_not_fit(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    config = config_from_hf(hf.config)
    state = dict(hf.state_dict())
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"src: weights do not fit the config: missing HF tensors for "
        r"layers\.1\.mlp\.linear_fc1\.weight; unexpected HF tensors "
        r"model\.extra\.weight",
    ):
        state_from_hf(config, state, "src")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_hf(tmp_path / "missing")


# --- Megatron initialisation -------------------------------------------------------------------------------


def test_random_init_follows_megatron():
    layers = 4
    config = ModelConfig(**tiny(
        "qwen2", vocab_size=512, hidden_size=256, num_layers=layers, num_attention_heads=4, num_query_groups=2,
        head_dim=64, ffn_hidden_size=512, init_std=0.02,
    ))
    torch.manual_seed(0)
    model = GPTModel(config)
    out_std = 0.02 / (2 * layers) ** 0.5
    seen = 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = out_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0.02
            assert abs(p.std().item() - want) / want < 0.03, f"{name}: std {p.std().item():.5f}, expected {want:.5f}"
            assert abs(p.mean().item()) < want / 20, name
            seen += 1
    assert seen == 2 + 5 * layers  # embedding, output layer; qkv, proj, fc1, gate, fc2 per layer


# --- tools/convert_checkpoint.py ---------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_tokenizer_dir) -> Path:
    """A tiny llama (GQA, untied) saved by transformers, with the test tokenizer's files."""
    out = tmp_path_factory.mktemp("convert") / "hf_llama"
    hf_model("llama", seed=1).save_pretrained(out)
    for f in hf_tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.mark.slow
def test_cli_import_export_extract(tmp_path, hf_dir, hf_tokenizer_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    r = cli("import", "--input", hf_dir, "--output", ckpt)
    assert r.returncode == 0, r.stderr
    config, state = load_checkpoint(ckpt)
    assert f"{config.num_parameters():,}" in r.stdout and str(ckpt) in r.stdout
    _, hf_state = load_hf(hf_dir)
    assert all(torch.equal(state[k], hf_state[k]) for k in hf_state) and sorted(state) == sorted(hf_state)
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()

    assert convert_main(["export", "--input", str(ckpt), "--output", str(exported)]) == 0  # in-process: saves time
    assert str(exported) in capsys.readouterr().out
    # --overwrite replaces an existing output; --dtype casts the floating-point weights
    assert convert_main(["import", "--input", str(hf_dir), "--output", str(exported), "--dtype", "bfloat16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    argv = ["import", "--input", str(hf_dir), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    assert convert_main(argv) == 0 and convert_main([*argv, "--overwrite"]) == 0
    bf16_config, bf16 = load_checkpoint(tmp_path / "bf16")
    assert bf16_config == config and all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert torch.equal(bf16["embedding.weight"], state["embedding.weight"].bfloat16())
    before, after = safetensors_of(hf_dir), safetensors_of(exported)
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert (
        tok("a tensor shard")["input_ids"]
        == AutoTokenizer.from_pretrained(hf_tokenizer_dir)("a tensor shard")["input_ids"]
    )

    # a uniform sub-network (Hugging Face can express it), chosen by counts; and a per-layer one by indices
    subnet_json = tmp_path / "subnet.json"
    subnet_json.write_text(
        json.dumps(
            {"num_layers": 1, "hidden_size": 36, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 33}
        )
    )
    student_dir, student_hf = tmp_path / "student", tmp_path / "student_hf"
    r = cli("extract", "--input", ckpt, "--subnet", subnet_json, "--output", student_dir)
    assert r.returncode == 0, r.stderr
    subnet = SubnetConfig.load(subnet_json, config)
    assert f"{subnet.num_parameters(config):,}" in r.stdout
    assert json.loads((student_dir / "subnet.json").read_text()) == subnet.to_dict()
    student_config, _ = load_checkpoint(student_dir)
    assert student_config == subnet.student_config(config)
    assert (student_dir / "tokenizer.json").is_file()
    r = cli("export", "--input", student_dir, "--output", student_hf)
    assert r.returncode == 0, r.stderr

    parent = our_model(config, state)
    student = AutoModelForCausalLM.from_pretrained(student_hf, local_files_only=True).eval()
    assert AutoTokenizer.from_pretrained(student_hf, local_files_only=True).vocab_size == tok.vocab_size
    x = token_batch(seed=3)
    with torch.no_grad():
        assert_logits_match(parent(x, subnet=subnet), student(x).logits)

    # importance order needs --importance; with fake scores the most important units are taken
    from megatron_subnet.model.importance import Importance, save_importance

    g = torch.Generator().manual_seed(0)
    n = config.num_layers
    imp = Importance(
        hidden=torch.rand(config.hidden_size, generator=g),
        heads=[torch.rand(config.layer_heads(i), generator=g) for i in range(n)],
        query_groups=[torch.rand(config.layer_query_groups(i), generator=g) for i in range(n)],
        mlp=[torch.rand(config.layer_ffn(i), generator=g) for i in range(n)],
        block=torch.tensor([0.1, 0.9]),
    )
    save_importance(imp, tmp_path / "importance.safetensors")
    by_importance = tmp_path / "subnet_importance.json"
    by_importance.write_text(json.dumps({"num_layers": 1, "hidden_size": 30, "order": "importance"}))
    argv = [
        "extract",
        "--input",
        ckpt,
        "--subnet",
        by_importance,
        "--importance",
        tmp_path / "importance.safetensors",
        "--output",
        tmp_path / "student_imp",
    ]
    assert convert_main(list(map(str, argv))) == 0
    saved = json.loads((tmp_path / "student_imp" / "subnet.json").read_text())
    assert saved["layers"] == [1]
    assert saved["hidden"] == sorted(torch.argsort(imp.hidden, descending=True)[:30].tolist())


def _truncated(src: Path, dst: Path, name: str = "model.safetensors") -> Path:
    shutil.copytree(src, dst)
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 2])
    return dst


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_cli_bad_inputs_fail_with_one_line(tmp_path, hf_dir, capsys):
    """Each bad input: exit code 2, one ``error:`` line naming the file and the problem, no output written.

    The cases marked ``SUBPROCESS`` run the script as users do; the others call its ``main`` (same code, no
    interpreter start-up: this machine pays seconds for each).
    """
    ckpt = tmp_path / "ckpt"
    config, state = load_hf(hf_dir)
    save_checkpoint(ckpt, config, state)
    per_layer, narrow = tmp_path / "per_layer", tmp_path / "narrow"
    sub = SubnetConfig.from_counts(config, num_attention_heads=[6, 3], num_query_groups=[2, 1])
    save_checkpoint(per_layer, *extract_state_dict(config, state, sub))
    save_checkpoint(narrow, *extract_state_dict(config, state, SubnetConfig.from_counts(config, hidden_size=44)))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(200))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")

    def subnet_file(name: str, content) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    good = SubnetConfig.from_counts(config, num_layers=2, hidden_size=8, num_query_groups=1).to_dict()
    extract = ["extract", "--input", ckpt, "--subnet"]
    cases = {
        "truncated safetensors": (
            ["import", "--input", _truncated(hf_dir, tmp_path / "trunc_hf")],
            ["trunc_hf/model.safetensors", "corrupt or truncated"],
        ),
        "SUBPROCESS garbage gguf": (["import", "--input", garbage], ["garbage.gguf", "cannot read GGUF"]),
        "SUBPROCESS config with more layers": (
            ["import", "--input", _with_config(hf_dir, tmp_path / "more_layers", num_hidden_layers=3)],
            ["more_layers", "missing HF tensors for layers.2."],
        ),
        "config with fewer layers": (
            ["import", "--input", _with_config(hf_dir, tmp_path / "fewer_layers", num_hidden_layers=1)],
            ["fewer_layers", "unexpected HF tensors model.layers.1."],
        ),
        "config with another width": (
            ["import", "--input", _with_config(hf_dir, tmp_path / "wider", intermediate_size=64)],
            ["wider", "wrong shape", "linear_fc1.weight (56, 48) != (64, 48)"],
        ),
        "unsupported activation": (
            ["import", "--input", _with_config(hf_dir, tmp_path / "mpt", hidden_act="gelu")],
            ["mpt", "hidden_act 'gelu' is not supported"],
        ),
        "missing input": (["import", "--input", tmp_path / "nowhere"], ["nowhere", "no such file"]),
        "not a model": (["import", "--input", notes], ["notes.txt", "directory or a .gguf"]),
        "no config.json": (["import", "--input", empty_dir], ["empty", "config.json"]),
        "SUBPROCESS truncated checkpoint": (
            ["export", "--input", _truncated(ckpt, tmp_path / "trunc_ckpt")],
            ["trunc_ckpt/model.safetensors", "corrupt or truncated"],
        ),
        "not a checkpoint": (["export", "--input", hf_dir], ["hf_llama", "not a checkpoint"]),
        "per-layer export": (["export", "--input", per_layer], ["per_layer", "per-layer sizes"]),
        "hidden not a multiple of heads": (
            ["export", "--input", narrow],
            ["narrow", "hidden_size (44) to be a multiple of num_attention_heads (6)"],
        ),
        "SUBPROCESS index out of range": (
            [*extract, subnet_file("range", {**good, "layers": [0, 2]})],
            ["range.json", "layers: index 2 out of range for 2 parent layers"],
        ),
        "heads outside groups": (
            [*extract, subnet_file("heads", {**good, "heads": [[0, 1, 2], [3]]})],
            ["heads.json", "heads[1]: head 3 belongs to query group 1, which is not kept"],
        ),
        "uneven heads per group": (
            [*extract, subnet_file("uneven", {**good, "query_groups": [[0, 1], [0]], "heads": [[0, 1, 3], [0]]})],
            ["uneven.json", "every kept group must keep the same number"],
        ),
        "duplicate index": (
            [*extract, subnet_file("dup", {**good, "hidden": [0, 1, 1, 2]})],
            ["dup.json", "hidden: duplicate index 1"],
        ),
        "empty layers": (
            [*extract, subnet_file("empty", {**good, "layers": [], "heads": [], "query_groups": [], "mlp": []})],
            ["empty.json", "layers: empty"],
        ),
        "bad json": ([*extract, subnet_file("broken", "{oops")], ["broken.json", "invalid sub-network"]),
        "too many counts": (
            [*extract, subnet_file("big", {"hidden_size": 49})],
            ["big.json", "hidden_size 49: must be in 1..48"],
        ),
        "missing subnet": ([*extract, tmp_path / "absent.json"], ["--subnet", "absent.json", "no such file"]),
        "importance without scores": (
            [*extract, subnet_file("imp", {"num_layers": 1, "order": "importance"})],
            ["imp.json", "needs importance scores"],
        ),
        "bad importance file": (
            [*extract, subnet_file("ok", good), "--importance", notes],
            ["notes.txt", "importance"],
        ),
        "output not empty": (
            [*extract, subnet_file("ok2", good), "--output", busy],
            ["--output", "busy", "--overwrite"],
        ),
        "output is the input": ([*extract, subnet_file("ok3", good), "--output", ckpt], ["--output", "is the input"]),
    }

    def output_of(name: str, args: list) -> tuple[Path, list[str]]:
        out = tmp_path / "out" / name.replace(" ", "_")
        return out, [str(a) for a in (args if "--output" in args else [*args, "--output", out])]

    subprocess_cases = [name for name in cases if name.startswith("SUBPROCESS")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = {name: pool.submit(cli, *output_of(name, cases[name][0])[1]) for name in subprocess_cases}
        results = {}
        for name, (args, _) in cases.items():
            if name not in running:
                code = convert_main(output_of(name, args)[1])
                captured = capsys.readouterr()
                results[name] = (code, captured.out, captured.err)
        for name, future in running.items():
            r = future.result()
            results[name] = (r.returncode, r.stdout, r.stderr)
    for name, (args, expected) in cases.items():
        code, stdout, stderr = results[name]
        assert code == 2, f"{name}: exit {code}\n{stdout}\n{stderr}"
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: stderr is not one line:\n{stderr}"
        for text in expected:
            assert text in lines[0], f"{name}: {text!r} not in {lines[0]!r}"
        print(f"{name}: {lines[0]}")
        assert not output_of(name, args)[0].exists(), f"{name}: the output was created"
        assert stdout == "", f"{name}: {stdout}"
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    assert load_checkpoint(ckpt)[0] == config
    leftovers = [
        p.name for d in (tmp_path, tmp_path / "out") if d.is_dir() for p in d.iterdir() if p.name.startswith(".")
    ]
    assert not leftovers, leftovers
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- issue 8: nothing lost, nothing left behind -----------------------------------------------------------


def _tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (hidden ones included), by path: equal before and after = untouched."""
    import hashlib

    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def test_cli_never_replaces_a_directory_that_holds_or_lies_inside_an_input(tmp_path, hf_dir, capsys):
    """``extract --output PARENT_OF_INPUT --overwrite`` used to delete the teacher (after loading it): now every
    command refuses an output that is, holds or lies inside one of its inputs, before loading anything."""
    runs = tmp_path / "runs"
    ckpt = runs / "teacher"
    save_checkpoint(ckpt, *load_hf(hf_dir))
    broken = runs / "broken"
    _truncated(ckpt, broken)  # loading it would fail: the output check must come first
    subnets = tmp_path / "subnets"
    subnets.mkdir()
    subnet = subnets / "s.json"
    subnet.write_text(json.dumps({"num_layers": 1}))
    scores = tmp_path / "scores"
    scores.mkdir()
    (scores / "imp.safetensors").write_bytes(b"not read")
    extract = ["extract", "--input", ckpt, "--subnet", subnet]
    cases = [
        ([*extract, "--output", runs], ["--output", "contains the input --input", "write somewhere else"]),
        ([*extract, "--output", ckpt / "student"], ["--output", "lies inside the input --input"]),
        ([*extract, "--output", ckpt], ["--output", "is the input --input"]),
        ([*extract, "--output", subnets], ["--output", "contains the input --subnet"]),
        ([*extract, "--importance", scores / "imp.safetensors", "--output", scores],
         ["--output", "contains the input --importance"]),
        (["extract", "--input", broken, "--subnet", subnet, "--output", runs], ["contains the input --input"]),
        (["export", "--input", ckpt, "--output", runs], ["--output", "contains the input --input"]),
        (["import", "--input", hf_dir, "--output", hf_dir.parent], ["--output", "contains the input --input"]),
        (["import", "--input", hf_dir, "--output", hf_dir / "sub"], ["--output", "lies inside the input --input"]),
    ]
    before = _tree_digest(tmp_path, hf_dir.parent)
    for args, expected in cases:
        code = convert_main([*map(str, args), "--overwrite"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (args, captured.err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
        assert all(text in lines[0] for text in expected), (expected, lines[0])
        assert captured.out == ""
    assert _tree_digest(tmp_path, hf_dir.parent) == before  # inputs unchanged, nothing new anywhere


def test_cli_removes_the_temporary_directory_a_killed_run_left(tmp_path, hf_dir, capsys):
    """A SIGKILLed ``import --overwrite`` leaves ``.NAME.tmp-HOST-PID-RANDOM``: the next run of the command
    removes it (its process is gone) and leaves no hidden file behind."""
    from megatron_subnet import outputs

    out = tmp_path / "ckpt"
    argv = ["import", "--input", str(hf_dir), "--output", str(out)]
    assert convert_main(argv) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".ckpt.tmp-{outputs._HOST}-{dead.pid}-0a1b2c"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a checkpoint")
    old = tmp_path / f".ckpt.old-{outputs._HOST}-{dead.pid}-3d4e5f"  # killed between the two renames
    old.mkdir()
    assert convert_main([*argv, "--overwrite"]) == 0
    assert f"removed {leftover}" in capsys.readouterr().err
    assert not leftover.exists() and not old.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    config, _ = load_checkpoint(out)
    assert config == load_hf(hf_dir)[0]


def test_every_architecture_has_one_family_and_an_unknown_one_is_named():
    """hf.py reads every per-architecture fact from ``FAMILIES``: each ModelConfig architecture has an entry,
    and a family without one is an error naming the supported ones (not silently another family's names)."""
    from types import SimpleNamespace

    from megatron_subnet.model.config import ARCHITECTURES, ConfigError
    from megatron_subnet.model.hf import FAMILIES, family

    assert set(FAMILIES) == set(ARCHITECTURES)
    with pytest.raises(ConfigError, match=r"arch 'mamba': no Hugging Face mapping \(supported: llama, gpt_neox\)"):
        family(SimpleNamespace(arch="mamba"))
