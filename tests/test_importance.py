"""Activation importance (megatron_subnet.model.importance) and tools/compute_importance.py on tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_subnet.data.indexed import IndexedDatasetBuilder
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.evaluation import lm_loss
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.importance import (
    Importance,
    ImportanceError,
    compute_importance,
    load_importance,
    save_importance,
)
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import save_checkpoint
from tests.tiny_models import tiny_shape
from tools.compute_importance import main as importance_main

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64

LLAMA = tiny_shape("llama")
NEOX = tiny_shape("gpt_neox")


def tiny_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(ModelConfig(**{**LLAMA, **overrides})).eval()


def tiny_batches(n: int = 3, batch: int = 2, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq + 1), generator=g) for _ in range(n)]


def tiny_dataset(prefix: Path, num_docs: int = 60, seed: int = 0) -> str:
    """Random documents of 10..80 tokens below VOCAB."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for n in rng.integers(10, 81, size=num_docs):
            builder.add_document(rng.integers(0, VOCAB, size=n))
    return str(prefix)


def tiny_checkpoint(directory: Path, model: GPTModel) -> str:
    save_checkpoint(directory, model.config, model.state_dict())
    return str(directory)


def zero_head(model: GPTModel, layer: int, group: int, head_in_group: int | None = None) -> None:
    """Zero the fused-QKV rows of one query head and its group's key/value heads (or the whole group)."""
    c, d = model.config, model.config.head_dim
    per_group = c.layer_heads(layer) // c.layer_query_groups(layer)
    block = (per_group + 2) * d
    w = model.layers[layer].self_attention.linear_qkv.weight
    with torch.no_grad():
        if head_in_group is None:
            w[group * block : (group + 1) * block] = 0
        else:
            w[group * block + head_in_group * d : group * block + (head_in_group + 1) * d] = 0
            w[group * block + per_group * d : (group + 1) * block] = 0


def make_identity(model: GPTModel, layer: int) -> None:
    with torch.no_grad():
        for linear in (model.layers[layer].self_attention.linear_proj, model.layers[layer].mlp.linear_fc2):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "gpt_neox"])
def test_scores_have_the_parents_shapes(arch):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**arch)).eval()
    c = model.config
    imp = compute_importance(model, tiny_batches(), progress=False)
    assert imp.hidden.shape == (c.hidden_size,) and imp.block.shape == imp.drop_loss.shape == (c.num_layers,)
    assert len(imp.heads) == len(imp.query_groups) == len(imp.mlp) == c.num_layers
    for i in range(c.num_layers):
        assert imp.heads[i].shape == (c.layer_heads(i),)
        assert imp.query_groups[i].shape == (c.layer_query_groups(i),)
        assert imp.mlp[i].shape == (c.layer_ffn(i),)
        per_group = c.layer_heads(i) // c.layer_query_groups(i)
        torch.testing.assert_close(imp.query_groups[i], imp.heads[i].view(-1, per_group).sum(1))
    assert all(torch.isfinite(t).all() for t in [imp.hidden, imp.block, imp.drop_loss, *imp.heads, *imp.mlp])
    assert (imp.block > 0).all() and (imp.hidden > 0).all()
    assert imp.layers is imp.block
    assert imp.metadata["num_tokens"] == str(3 * 2 * 16) and imp.metadata["drop_loss_tokens"] == str(3 * 2 * 16)
    assert not model.training


def test_zeroed_head_and_group_score_lowest():
    model = tiny_model(num_attention_heads=4, num_query_groups=4)  # one head per group: a head owns its k/v
    zero_head(model, layer=1, group=2, head_in_group=0)
    imp = compute_importance(model, tiny_batches(), progress=False)
    assert imp.heads[1][2] == 0 and int(imp.heads[1].argmin()) == 2
    assert (imp.heads[1][[0, 1, 3]] > 0).all()

    model = tiny_model()  # 4 heads in 2 groups
    zero_head(model, layer=0, group=1)
    imp = compute_importance(model, tiny_batches(), progress=False)
    assert int(imp.query_groups[0].argmin()) == 1 and imp.query_groups[0][1] == 0
    assert (imp.heads[0][2:] == 0).all() and (imp.heads[0][:2] > 0).all()


def test_zeroed_neuron_and_channel_score_zero():
    model = tiny_model()
    with torch.no_grad():
        model.layers[2].mlp.linear_fc1.weight[5] = 0  # up projection: act(gate) * 0
        for norm in [model.final_layernorm, *(n for layer in model.layers
                                              for n in (layer.input_layernorm, layer.pre_mlp_layernorm))]:
            norm.weight[7] = 0
    imp = compute_importance(model, tiny_batches(), drop_loss_iters=0, progress=False)
    assert imp.mlp[2][5] == 0 and int(imp.mlp[2].argmin()) == 5
    assert imp.hidden[7] == 0 and int(imp.hidden.argmin()) == 7
    assert imp.drop_loss is None and imp.metadata["drop_loss_tokens"] == "0"


def test_identity_layer_has_no_block_importance_and_no_drop_loss():
    model = tiny_model()
    make_identity(model, 2)
    imp = compute_importance(model, tiny_batches(), progress=False)
    assert abs(float(imp.block[2])) < 1e-6 and int(imp.block.argmin()) == 2
    assert abs(float(imp.drop_loss[2])) < 1e-6
    assert (imp.block[[0, 1, 3]] > 1e-3).all()


def test_drop_loss_is_the_masked_models_loss_increase():
    model = tiny_model(seed=1)
    batches = tiny_batches(n=3)
    imp = compute_importance(model, batches, drop_loss_iters=2, progress=False)
    full = SubnetConfig.full(model.config)
    expected = torch.zeros(model.config.num_layers)
    with torch.no_grad():
        for batch in batches[:2]:
            inputs, labels = batch[:, :-1], batch[:, 1:]
            base = lm_loss(model(inputs), labels)
            for i in range(model.config.num_layers):
                keep = [j for j in range(model.config.num_layers) if j != i]
                subnet = SubnetConfig(keep, full.hidden, [full.heads[j] for j in keep],
                                      [full.query_groups[j] for j in keep], [full.mlp[j] for j in keep])
                expected[i] += (lm_loss(model(inputs, subnet=subnet), labels) - base) / 2
    torch.testing.assert_close(imp.drop_loss, expected, atol=1e-5, rtol=1e-5)
    assert imp.metadata["drop_loss_tokens"] == str(2 * 2 * 16)


def test_from_counts_keeps_the_most_important():
    model = tiny_model(num_attention_heads=4, num_query_groups=4)
    make_identity(model, 1)
    zero_head(model, layer=3, group=0, head_in_group=0)
    with torch.no_grad():
        model.layers[3].mlp.linear_fc1.weight[[0, 1]] = 0
    imp = compute_importance(model, tiny_batches(), progress=False)
    c = model.config
    subnet = SubnetConfig.from_counts(c, num_layers=3, num_attention_heads=3, num_query_groups=3,
                                      ffn_hidden_size=46, importance=imp)
    assert subnet.layers == [0, 2, 3]
    assert 0 not in subnet.heads[2] and 0 not in subnet.query_groups[2]
    assert subnet.mlp[2] == list(range(2, 48))
    first = SubnetConfig.from_counts(c, num_layers=3, num_attention_heads=3, num_query_groups=3, ffn_hidden_size=46)
    assert first.layers == [0, 1, 2]
    # the drop-loss ordering drops the layer whose removal helps the loss most (here < 0: random weights)
    by_drop = SubnetConfig.from_counts(c, num_layers=3, importance=imp.with_layer_metric("drop_loss"))
    assert by_drop.layers == sorted(imp.drop_loss.argsort(descending=True)[:3].tolist())


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    imp = compute_importance(model, tiny_batches(), layer_metric="drop_loss", progress=False)
    path = tmp_path / "imp.safetensors"
    save_importance(imp, path)
    back = load_importance(path, parent=model.config)
    assert back.layer_metric == "drop_loss" and back.layers is back.drop_loss
    for name in ("hidden", "block", "drop_loss"):
        torch.testing.assert_close(getattr(back, name), getattr(imp, name), rtol=0, atol=0)
    for name in ("heads", "query_groups", "mlp"):
        for a, b in zip(getattr(back, name), getattr(imp, name)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert back.metadata["num_tokens"] == imp.metadata["num_tokens"]
    assert back.metadata["parent_config_sha256"] == imp.metadata["parent_config_sha256"]
    assert load_importance(path, layer_metric="block").layers is not None
    assert torch.equal(load_importance(path, layer_metric="block").layers, imp.block)


def test_load_rejects_bad_files(tmp_path):
    model = tiny_model()
    imp = compute_importance(model, tiny_batches(n=1), drop_loss_iters=0, progress=False)
    path = tmp_path / "imp.safetensors"
    imp.save(path)
    with pytest.raises(ImportanceError, match="no drop-loss"):
        load_importance(path, layer_metric="drop_loss")
    with pytest.raises(ImportanceError, match="layer"):
        load_importance(path, parent=ModelConfig(**{**LLAMA, "num_layers": 5}))
    with pytest.raises(ImportanceError, match=r"mlp\.0"):
        load_importance(path, parent=ModelConfig(**{**LLAMA, "ffn_hidden_size": 40}))
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(ImportanceError, match="cannot read"):
        load_importance(tmp_path / "junk")
    with pytest.raises(ImportanceError, match="cannot read"):
        load_importance(tmp_path / "missing.safetensors")
    with pytest.raises(ImportanceError, match="layer_metric"):
        Importance(imp.hidden, imp.heads, imp.query_groups, imp.mlp, imp.block, layer_metric="depth")


def test_tool_writes_scores(tmp_path):
    model = tiny_model()
    ckpt = tiny_checkpoint(tmp_path / "ckpt", model)
    data = tiny_dataset(tmp_path / "data" / "d")
    out = tmp_path / "imp.safetensors"
    args = ["--load", ckpt, "--data-path", data, "--split", "80,20,0", "--seq-length", "16",
            "--micro-batch-size", "2", "--calib-iters", "3", "--drop-loss-iters", "1", "--output", str(out)]
    assert importance_main(args) == 0
    imp = load_importance(out, parent=model.config)
    assert imp.metadata["num_tokens"] == str(3 * 2 * 16) and imp.metadata["drop_loss_tokens"] == str(2 * 16)
    assert imp.metadata["split_name"] == "train"


def test_tool_errors_are_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tiny_model())
    data = tiny_dataset(tmp_path / "d")
    common = ["--seq-length", "16", "--micro-batch-size", "2", "--calib-iters", "2", "--output", str(tmp_path / "o")]
    cases = [
        (["--load", str(tmp_path / "nope"), "--data-path", data], "no such file"),
        (["--load", ckpt, "--data-path", str(tmp_path / "nodata")], "no such file"),
        (["--load", str(tmp_path / "empty"), "--data-path", data], "not a checkpoint"),
    ]
    (tmp_path / "empty").mkdir()  # not tmp_path itself: --output may not lie inside --load
    for args, message in cases:
        assert importance_main(args + common) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_importance.py"), "--load", "nope",
                           "--data-path", data, *common], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------- issue 8: outputs, flags, NaN


def _digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _one_error_line(capsys, *texts) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert all(t in lines[0] for t in texts), (texts, lines[0])


def tool_args(ckpt: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--load", ckpt, "--data-path", data, "--split", "80,20,0", "--seq-length", "16",
            "--micro-batch-size", "2", "--calib-iters", "1", "--drop-loss-iters", "1", "--output", str(out), *extra]


def test_tool_replaces_an_existing_output_only_with_overwrite(tmp_path, capsys):
    model = tiny_model()
    ckpt = tiny_checkpoint(tmp_path / "ckpt", model)
    data = tiny_dataset(tmp_path / "data" / "d")
    out = tmp_path / "imp.safetensors"
    out.write_bytes(b"earlier scores")
    before = _digest(tmp_path)
    assert importance_main(tool_args(ckpt, data, out)) == 1
    _one_error_line(capsys, f"--output {out}", "exists", "--overwrite")
    assert _digest(tmp_path) == before
    assert importance_main(tool_args(ckpt, data, out, "--overwrite")) == 0
    assert load_importance(out, parent=model.config).metadata["num_tokens"] == str(2 * 16)


def test_tool_checks_flags_and_output_before_loading(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tiny_model(max_position_embeddings=8))
    (Path(ckpt) / "model.safetensors").write_bytes(b"truncated")  # loading the weights would fail: none of these do
    data = tiny_dataset(tmp_path / "data" / "d")
    (tmp_path / "a_dir").mkdir()
    cases = [
        (["--drop-loss-iters", "-1"], 2, ["--drop-loss-iters", "'-1'"]),
        (["--calib-iters", "0"], 2, ["--calib-iters", "'0'"]),
        (["--device", "cuda:99"], 1, ["--device cuda:99"]),
        (["--seq-length", "16"], 1, ["--seq-length 16", "max_position_embeddings 8"]),
        (["--output", str(tmp_path / "a_dir")], 1, ["--output", "is a directory"]),
        (["--output", str(Path(ckpt) / "imp.safetensors")], 1, ["--output", "lies inside the input --load"]),
        (["--output", data + ".idx", "--overwrite"], 1, ["--output", "is the input --data-path"]),
    ]
    before = _digest(tmp_path)
    for extra, code, texts in cases:
        try:
            rc = importance_main(tool_args(ckpt, data, tmp_path / "imp.safetensors", *extra))
        except SystemExit as e:
            rc = e.code
        assert rc == code, (extra, capsys.readouterr().err)
        _one_error_line(capsys, *texts)
        assert _digest(tmp_path) == before, extra


def test_tool_writes_no_scores_that_are_not_finite(tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.layers[2].mlp.linear_fc2.weight[3, 3] = float("nan")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", model)
    data = tiny_dataset(tmp_path / "data" / "d")
    before = _digest(tmp_path)
    assert importance_main(tool_args(ckpt, data, tmp_path / "imp.safetensors")) == 1
    _one_error_line(capsys, f"--load {ckpt}", "not finite", "nothing was written")
    assert _digest(tmp_path) == before


def test_tool_in_a_subprocess_gives_one_line_and_no_traceback(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tiny_model())
    data = tiny_dataset(tmp_path / "d")
    out = tmp_path / "imp.safetensors"
    out.write_bytes(b"keep me")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_importance.py"),
                           *tool_args(ckpt, data, out)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --output"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"keep me"


# ---------------------------------------------------------------------- issue 12: FLOPs spent


@pytest.mark.parametrize("arch", [LLAMA, NEOX], ids=["llama", "gpt_neox"])
def test_flops_in_the_metadata_equal_the_flop_counter(arch):
    """The calibration forwards and every layer-dropped evaluation of the drop loss, as FlopCounterMode counts
    them (attention as two dense bmms)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_subnet.model.flops import forward_flops_per_token

    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**arch)).eval()
    batches = tiny_batches(n=3)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        imp = compute_importance(model, batches, drop_loss_iters=2, progress=False)
    meta = imp.metadata
    assert int(meta["calibration_flops"]) == int(forward_flops_per_token(model.config, 16)) * 3 * 2 * 16
    assert int(meta["drop_loss_flops"]) > 0
    assert int(meta["flops"]) == int(meta["calibration_flops"]) + int(meta["drop_loss_flops"])
    assert int(meta["flops"]) == counter.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        imp = compute_importance(model, batches, drop_loss_iters=0, progress=False)
    assert imp.metadata["drop_loss_flops"] == "0" and int(imp.metadata["flops"]) == counter.get_total_flops()


def test_drop_loss_flops_count_one_evaluation_per_dropped_layer():
    from megatron_subnet.model.flops import forward_flops_per_token
    from megatron_subnet.model.importance import drop_loss_flops_per_token

    c = ModelConfig(**LLAMA)
    full = SubnetConfig.full(c)
    whole = 0
    for i in range(c.num_layers):  # through pipeline stages: the masked model without layer i, once per layer
        keep = [j for j in range(c.num_layers) if j != i]
        dropped = SubnetConfig(keep, full.hidden, [full.heads[j] for j in keep], [full.query_groups[j] for j in keep],
                               [full.mlp[j] for j in keep])  # fmt: skip
        whole += int(forward_flops_per_token(dropped.student_config(c), 16))
    assert drop_loss_flops_per_token(c, 16, pipelined=True) == whole
    # in one process layer i's evaluation starts from its recorded input: the layers after it and the head
    assert drop_loss_flops_per_token(c, 16) < whole


def test_tool_prints_and_stores_the_flops(tmp_path, capsys):
    from megatron_subnet.model.flops import forward_flops_per_token
    from megatron_subnet.model.importance import drop_loss_flops_per_token

    model = tiny_model()
    ckpt = tiny_checkpoint(tmp_path / "ckpt", model)
    data = tiny_dataset(tmp_path / "data" / "d")
    out = tmp_path / "imp.safetensors"
    assert importance_main(tool_args(ckpt, data, out, "--calib-iters", "2")) == 0
    meta = load_importance(out, parent=model.config).metadata
    expected = (int(forward_flops_per_token(model.config, 16)) * 2 * 2 * 16
                + drop_loss_flops_per_token(model.config, 16) * 2 * 16)  # fmt: skip
    assert int(meta["flops"]) == expected
    assert f"{expected:.3e} FLOPs" in capsys.readouterr().out
