"""Resuming at another TP x PP x DP layout through DeepSpeed's universal checkpoints.

A tiny llama student with grouped-query attention (4 heads in 2 query groups) and a tied embedding, distilled
from its parent, is saved after step 3 at one layout, converted (``tools/convert_checkpoint.py universal``) and
resumed at another; its steps 4-8 equal an uninterrupted run at the new layout (loss, KD part, gradient norm
within 1e-5): TP=2 x PP=2 x DP=1 (ZeRO-1) to TP=1 x PP=1 x DP=2 (ZeRO-2) and to TP=1 x PP=2 x DP=2 (ZeRO-1),
TP=1 x PP=1 x DP=2 (ZeRO-2) to TP=2 x PP=2, and in bf16 within the suite's bf16 bound. What DeepSpeed is
told of our tensors moves every tensor of llama (tied, untied, GQA) and GPT-NeoX (biases) to another TP size.
The Adam moments a resumed run holds are the saved ones, reassembled from the source's ZeRO partitions and
tensor-parallel shards by our own merge. The refusals are one line each, and come before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training_utils import (
    build_workspace,
    ok,
    run_many,
    spawn_cmd,
    train_records,
)

ITERS, SAVED = 8, 3  # each run takes 8 steps; the resumed ones start from the checkpoint of step 3
REL, BF16_REL = 1e-5, 0.01
KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # what DeepSpeed's ZeRO optimizer holds of a parameter
TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The training workspace, a GQA student of 4 layers that splits over 2 TP ranks and 2 stages, and the
    ds_configs (ZeRO-1 and -2, fp32 and bf16)."""
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config

    root = build_workspace(tmp_path_factory.mktemp("universal"))
    SubnetConfig.from_counts(
        load_config(root / "teacher"), num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64,
    ).save(root / "subnet_gqa.json")  # fmt: skip
    for stage in (1, 2):
        config = json.loads((root / f"zero{stage}.json").read_text())
        (root / f"bf16_zero{stage}.json").write_text(json.dumps({**config, "bf16": {"enabled": True}}))
    return root


def flags(ws: Path, out: Path, stage: int = 1, bf16: bool = False) -> list[str]:
    return [
        "--ds_config", str(ws / f"{'bf16_' * bf16}zero{stage}.json"), *(["--bf16"] if bf16 else []),
        "--teacher-load", f"{ws}/teacher", "--subnet", f"{ws}/subnet_gqa.json",
        "--data-path", f"{ws}/data", "--split", "80,10,10",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", str(ITERS), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
        "--seed", "1234", "--log-interval", "1", "--eval-interval", str(ITERS), "--eval-iters", "1",
        "--log-dir", str(out),
    ]  # fmt: skip


def layout(tp: int, pp: int) -> list[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def saving(out: Path) -> list[str]:
    return ["--save", str(out / "ckpt"), "--save-interval", str(SAVED), "--keep-last", "5"]


def convert(save: Path, output: Path) -> None:
    """``tools/convert_checkpoint.py universal`` (in this process) on ``save``'s checkpoint of step 3."""
    argv = ["universal", "--input", str(save), "--iteration", str(SAVED), "--output", str(output)]
    assert _tool().main(argv) == 0


def _tool():
    """tools/convert_checkpoint.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def runs(ws) -> dict[str, Path]:
    """The uninterrupted runs (each saving at step 3; bf16's source, only a source, stops there), the
    universal checkpoints of their step 3, and the runs resumed from them at another layout (each saving);
    two jobs at a time."""
    out = {name: ws / name for name in (
        "tp2pp2", "dp2", "pp2dp2", "bf16_tp2pp2", "bf16_dp2",
        "tp2pp2_to_dp2", "tp2pp2_to_pp2dp2", "dp2_to_tp2pp2", "bf16_tp2pp2_to_dp2")}  # fmt: skip
    stop = {"stop_after_save": SAVED}
    uninterrupted = [
        ("tp2pp2", 4, layout(2, 2), 1, False, None), ("pp2dp2", 4, layout(1, 2), 1, False, None),
        ("bf16_tp2pp2", 4, layout(2, 2), 1, True, stop), ("dp2", 2, layout(1, 1), 2, False, None),
        ("bf16_dp2", 2, layout(1, 1), 2, True, None),
    ]  # fmt: skip
    jobs = [(spawn_cmd(nproc, flags(ws, out[name], stage, bf16) + where + saving(out[name])), ws, None, 400, hooks)
            for name, nproc, where, stage, bf16, hooks in uninterrupted]  # fmt: skip
    resumed = [
        ("tp2pp2_to_pp2dp2", "tp2pp2", 4, layout(1, 2), 1, False, None),
        ("dp2_to_tp2pp2", "dp2", 4, layout(2, 2), 1, False, None),
        ("tp2pp2_to_dp2", "tp2pp2", 2, layout(1, 1), 2, False, {"optimizer_dump": str(out["tp2pp2_to_dp2"] / "adam")}),
        ("bf16_tp2pp2_to_dp2", "bf16_tp2pp2", 2, layout(1, 1), 2, True, None),
    ]  # fmt: skip
    resume_jobs = []
    for name, source, nproc, where, stage, bf16, hooks in resumed:
        load = ["--load", str(ws / f"{source}_universal"), "--universal-checkpoint", "--save", str(out[name] / "ckpt")]
        resume_jobs.append((spawn_cmd(nproc, flags(ws, out[name], stage, bf16) + where + load), ws, None, 400, hooks))
    for result in run_many(jobs):
        ok(result)
    for name in ("tp2pp2", "dp2", "bf16_tp2pp2"):
        convert(out[name] / "ckpt", ws / f"{name}_universal")
    for result in run_many(resume_jobs):
        ok(result)
    return out


@pytest.mark.slow  # end-to-end runs (make test-fast leaves them out)
@pytest.mark.parametrize(
    "resumed, uninterrupted, rel",
    [("tp2pp2_to_dp2", "dp2", REL), ("tp2pp2_to_pp2dp2", "pp2dp2", REL), ("dp2_to_tp2pp2", "tp2pp2", REL),
     ("bf16_tp2pp2_to_dp2", "bf16_dp2", BF16_REL)],
)  # fmt: skip
def test_a_universal_resume_at_another_layout_equals_the_uninterrupted_run(runs, resumed, uninterrupted, rel):
    """Steps 4-8 after the resume: loss, KD part and gradient norm as the run at the new layout that never
    stopped (Adam moments, step count, learning rate and data position carried over); none skipped."""
    got, expected = train_records(runs[resumed]), train_records(runs[uninterrupted])
    assert sorted(got) == list(range(SAVED + 1, ITERS + 1)), resumed
    for i in got:
        for key in ("loss", "kd", "grad_norm", "lr"):
            assert got[i][key] == pytest.approx(expected[i][key], rel=rel), (resumed, i, key)
        assert not got[i]["skipped"]
    assert got[SAVED + 1]["tokens"] == expected[SAVED + 1]["tokens"]


@pytest.mark.slow  # end-to-end runs (make test-fast leaves them out)
def test_the_bf16_runs_were_bf16(runs):
    """No step of the bf16 pair has the fp32 pair's loss (the precision was really changed)."""
    bf16, fp32 = train_records(runs["bf16_dp2"]), train_records(runs["dp2"])
    assert all(bf16[i]["loss"] != fp32[i]["loss"] for i in fp32)


@pytest.mark.slow  # end-to-end runs (make test-fast leaves them out)
def test_a_run_resumed_from_a_universal_checkpoint_saves_plain_checkpoints_at_its_layout(runs):
    """Its checkpoint is an ordinary one of the new layout (resumable without the flag), of the same run; the
    universal checkpoint it came from is untouched."""
    source = json.loads((runs["tp2pp2"] / "ckpt" / f"iter_{SAVED:07d}" / "megatron_subnet.json").read_text())
    save = runs["tp2pp2_to_dp2"] / "ckpt"
    meta = json.loads((save / f"iter_{ITERS:07d}" / "megatron_subnet.json").read_text())
    assert "universal" not in meta and meta["run_id"] == source["run_id"]
    assert meta["iteration"] == ITERS and meta["consumed_samples"] == ITERS * 4
    assert (meta["layout"]["world_size"], meta["layout"]["tensor_model_parallel_size"]) == (2, 1)
    assert (save / "final_model" / "model.safetensors").is_file()
    universal = runs["tp2pp2"].parent / "tp2pp2_universal"
    assert (universal / "latest").read_text() == f"iter_{SAVED:07d}"
    assert json.loads((universal / f"iter_{SAVED:07d}" / "megatron_subnet.json").read_text())["universal"]


def _saved_optimizer(iteration_dir: Path, config, tp: int, pp: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {fp32, exp_avg, exp_avg_sq}}`` of a ZeRO-1 checkpoint of one data-parallel rank, cut from each
    (TP, PP) rank's flat partitions by DeepSpeed's recorded offsets, the TP shards merged by our own
    ``merge_state_dicts``, the stages joined; a tied embedding's two copies must agree."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from megatron_subnet.model.weights import merge_state_dicts

    deepspeeds = [LossScaler, ZeroStageEnum, fragment_address]  # the classes DeepSpeed pickles into its files

    merged: dict[str, dict[str, torch.Tensor]] = {}
    for p in range(pp):
        shards = []
        for t in range(tp):
            mp = t + tp * p
            with torch.serialization.safe_globals(deepspeeds):
                zero = torch.load(iteration_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt",
                                  weights_only=True)  # fmt: skip
                model = torch.load(iteration_dir / f"mp_rank_{mp:02d}_model_states.pt", weights_only=True)
            optim = zero["optimizer_state_dict"]
            shard: dict[str, dict[str, torch.Tensor]] = {key: {} for key in KEYS}
            for g, shapes in enumerate(model["param_shapes"]):
                flat = dict(optim["base_optimizer_state"]["state"][g])
                flat["fp32"] = optim["single_partition_of_fp32_groups"][g]
                for name, shape in shapes.items():
                    where = optim["param_slice_mappings"][g][name]
                    for key in KEYS:
                        shard[key][name] = flat[key].narrow(0, where.start, where.numel).view(shape)
            shards.append(shard)
        by_key = {key: merge_state_dicts(config, [shard[key] for shard in shards]) for key in KEYS}
        for key, tensors in by_key.items():
            for name, tensor in tensors.items():
                if name in merged and key in merged[name]:
                    assert torch.equal(merged[name][key], tensor), (name, key, "the tied copies differ")
                merged.setdefault(name, {})[key] = tensor
    return merged


@pytest.mark.slow  # end-to-end runs (make test-fast leaves them out)
def test_the_adam_moments_after_a_universal_resume_are_the_saved_ones(ws, runs):
    """The TP=1 x PP=1 x DP=2 run resumed from the TP=2 x PP=2 checkpoint of step 3 holds, before its first
    step, every parameter's fp32 weight, exp_avg and exp_avg_sq bit for bit as the source's ZeRO partitions
    hold them once reassembled, and Adam's step count 3."""
    from safetensors.torch import load_file

    from megatron_subnet.model.config import ModelConfig

    iteration_dir = runs["tp2pp2"] / "ckpt" / f"iter_{SAVED:07d}"
    config = ModelConfig.from_dict(json.loads((iteration_dir / "megatron_subnet.json").read_text())["model_config"])
    saved = _saved_optimizer(iteration_dir, config, tp=2, pp=2)
    for rank in (0, 1):
        loaded = load_file(runs["tp2pp2_to_dp2"] / "adam" / f"rank_{rank}.safetensors")
        assert loaded.pop("step").tolist() == [float(SAVED)] * 2  # the decay and no-decay groups
        names = {key.rsplit("/", 1)[0] for key in loaded}
        assert names == set(saved), names ^ set(saved)
        for key, tensor in loaded.items():
            name, state = key.rsplit("/", 1)
            assert torch.equal(tensor, saved[name][state]), key


# ----------------------------------------------------------------------------- what DeepSpeed is told


def _deepspeed_join(info: dict, name: str, slices: list[torch.Tensor]) -> torch.Tensor:
    """DeepSpeed's converter on one tensor's TP slices (``ds_to_universal.merge_tp_slices``): a replicated
    tensor is taken once, a row-parallel one joined on dim 1, any other on dim 0; the vocabulary unpadded."""
    import re

    def matches(key: str) -> bool:
        return any(re.match(pattern, name) for pattern in info.get(key, []))

    if matches("tp_replicated_parameter_patterns"):
        return slices[0]
    whole = torch.cat(slices, dim=1 if matches("parameter_with_row_parallelism_patterns") else 0)
    return whole[: info["original_vocab_size"]] if matches("vocabulary_parameter_patterns") else whole


def _deepspeed_cut(info: dict, name: str, whole: torch.Tensor, shape: tuple, rank: int, size: int) -> torch.Tensor:
    """DeepSpeed's loader on one whole tensor (``universal_checkpoint.load_hp_checkpoint_state``): a rank whose
    tensor has the whole's shape takes it whole, others their chunk along the dimension it was joined on."""
    import re

    if tuple(whole.shape) == tuple(shape):
        return whole
    rows = any(re.match(p, name) for p in info["parameter_with_row_parallelism_patterns"])
    return whole.chunk(size, dim=1 if rows else 0)[rank]


@pytest.mark.parametrize("family, tied", [("llama", True), ("llama", False), ("gpt_neox", False)])
def test_the_universal_checkpoint_info_moves_every_tensor_to_another_tp_size(family, tied):
    """What our checkpoints tell DeepSpeed is right for every tensor: a random model's TP=2 shards (as our
    sharding cuts them: QKV rows by query group, GQA, biases, vocabulary), joined by DeepSpeed's rules for
    that info, are the whole model; cut by DeepSpeed's loader for TP=4 they are our TP=4 shards. Every pattern
    matches a parameter (DeepSpeed's converter refuses unused ones)."""
    import re

    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.shapes import expected_shapes
    from megatron_subnet.model.weights import shard_state_dict
    from megatron_subnet.parallel.layers import TPShard
    from megatron_subnet.training.universal import checkpoint_info
    from tests.tiny_models import tiny

    shape = dict(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=8, head_dim=8, ffn_hidden_size=128)
    if family == "gpt_neox":
        shape["num_query_groups"] = 8  # one head per group
    else:
        shape.update(num_query_groups=4, tie_word_embeddings=tied)  # grouped-query attention: 2 heads a group
    config = ModelConfig(**tiny(family, **shape))
    info = checkpoint_info(config)
    torch.manual_seed(0)
    model = GPTModel(config)
    whole = {name: p.detach() for name, p in model.named_parameters()}
    halves = [shard_state_dict(config, whole, TPShard(r, 2)) for r in range(2)]
    quarters = [shard_state_dict(config, whole, TPShard(r, 4)) for r in range(4)]
    shapes = [expected_shapes(config, TPShard(r, 4)) for r in range(4)]
    for name, tensor in whole.items():
        joined = _deepspeed_join(info, name, [half[name] for half in halves])
        assert torch.equal(joined, tensor), name
        for r in range(4):
            assert torch.equal(_deepspeed_cut(info, name, joined, shapes[r][name], r, 4), quarters[r][name]), name
    patterns = [p for key, value in info.items() if key.endswith("_patterns") for p in value]
    assert all(any(re.match(p, name) for name in whole) for p in patterns), patterns
    assert info.get("pipeline_replicated_parameter_patterns") == (["^embedding\\.weight$"] if tied else None)
    assert info["original_vocab_size"] == info["padded_vocab_size"] == 128


# ----------------------------------------------------------------------------- refusals


def _checkpoint(root: Path, iteration: int = 2, **meta) -> Path:
    """A --save directory whose ``latest`` checkpoint holds only our metadata (enough for every refusal)."""
    tag = f"iter_{iteration:07d}"
    (root / tag).mkdir(parents=True)
    layout = {"world_size": 1, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "zero_stage": 1,
              "bf16": False}  # fmt: skip
    record = {"iteration": iteration, "layout": layout, "model_config": {}, "universal_checkpoint_info": {}, **meta}
    (root / tag / "megatron_subnet.json").write_text(json.dumps(record))
    (root / "latest").write_text(tag)
    return root


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--input {save}: no such directory"),
        ("no_latest", "--input {save}: no 'latest' file"),
        ("iteration", "--iteration 7: {save} holds no complete iter_0000007 (it holds: iter_0000002)"),
        (
            "zero0",
            "iter_0000002 was saved at ZeRO stage 0, which keeps no optimizer partitions for DeepSpeed's "
            "universal checkpoint (its converter reads ZeRO stage 1-2 partitions): it resumes only at its own",
        ),
        ("zero3", "iter_0000002 was saved at ZeRO stage 3; converting ZeRO-3 checkpoints is not tested here"),
        ("universal", "iter_0000002 is already a universal checkpoint"),
        ("old", "iter_0000002 was written before checkpoints recorded how their tensors are split"),
        ("output", "--output {out}: exists and is not empty"),
        ("files", "--input {save}: iter_0000002: mp_rank_00_model_states.pt is missing"),
    ],
)
def test_the_conversion_refuses_what_it_cannot_convert_in_one_line(tmp_path, capsys, case, message):
    """Each refusal is one ``error:`` line naming the flag, exit 2, and no output written."""
    tool = _tool()
    save, out = tmp_path / "save", tmp_path / "out"
    layout = {"world_size": 1, "zero_stage": {"zero0": 0, "zero3": 3}.get(case, 1), "bf16": False}
    if case == "no_latest":
        save.mkdir()
    elif case != "missing":
        _checkpoint(save, **({"layout": layout} if case.startswith("zero") else {}),
                    **({"universal": {"from": "x"}} if case == "universal" else {}))  # fmt: skip
        if case == "old":
            record = json.loads((save / "iter_0000002" / "megatron_subnet.json").read_text())
            del record["universal_checkpoint_info"]
            (save / "iter_0000002" / "megatron_subnet.json").write_text(json.dumps(record))
    if case == "output":
        out.mkdir()
        (out / "kept").write_text("mine")
    argv = ["universal", "--input", str(save), "--output", str(out)] + (["--iteration", "7"] * (case == "iteration"))
    assert tool.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message.format(save=save, out=out) in lines[0], lines[0]
    assert (not out.exists()) if case != "output" else [p.name for p in out.iterdir()] == ["kept"]


def test_a_resume_that_mixes_universal_and_layout_specific_is_refused(tmp_path):
    """--universal-checkpoint on a layout's checkpoint names the conversion command; a universal checkpoint
    without the flag names the flag; another layout without one names the command; a universal checkpoint
    takes any parallel layout and ZeRO stage, not another precision."""
    from megatron_subnet.training.checkpoint import ResumeError, check_layout

    saved = {"world_size": 1, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
             "virtual_pipeline_model_parallel_size": 1, "zero_stage": 1, "bf16": False}  # fmt: skip
    meta = {"iteration": 3, "layout": saved, "model_config": {}}
    universal = {**meta, "universal": {"from": "save/iter_0000003", "layout": saved}}
    launch = {**saved, "world_size": 2, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "zero_stage": 2}  # fmt: skip
    command = "python tools/convert_checkpoint.py universal --input save --output save_universal"
    with pytest.raises(ResumeError, match="--universal-checkpoint: --load save is not a universal checkpoint; make "
                                          f"one with: {command}"):  # fmt: skip
        check_layout(meta, launch, None, "save", universal=True)
    with pytest.raises(
        ResumeError,
        match="--load save: checkpoint was written with world_size=1, this launch has "
        f"world_size=2; to resume at another layout, convert it .{command}",
    ):
        check_layout(meta, launch, None, "save")
    with pytest.raises(ResumeError, match="--load uc: is a universal checkpoint; resume from it with --universal"):
        check_layout(universal, saved, None, "uc")
    check_layout(universal, launch, None, "uc", universal=True)
    with pytest.raises(ResumeError, match="written with bf16=False, this launch has bf16=True$"):
        check_layout(universal, {**launch, "bf16": True}, None, "uc", universal=True)


def test_the_universal_flag_needs_a_load_and_a_zero_optimizer(tmp_path):
    from megatron_subnet.arguments import parse_config
    from megatron_subnet.training.config import ArgumentError, check_layout, reconcile_ds_config

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    (tmp_path / "student.json").write_text("{}")
    argv = ["--ds_config", str(tmp_path / "ds.json"), "--data-path", "data", "--micro-batch-size", "1",
            "--train-iters", "10", "--init", "random", "--model-config", str(tmp_path / "student.json"),
            "--kd-alpha", "0", "--universal-checkpoint"]  # fmt: skip
    with pytest.raises(ArgumentError, match="--universal-checkpoint: needs --load"):
        parse_config(argv)
    config = parse_config(argv + ["--load", str(tmp_path)])
    ds_config, _ = reconcile_ds_config(config, {"zero_optimization": {"stage": 1}}, dp_size=1)
    assert ds_config["checkpoint"] == {"load_universal": True}
    plain = parse_config(argv[:-1])
    with pytest.raises(ArgumentError, match="checkpoint.load_universal is True but --universal-checkpoint is not set"):
        reconcile_ds_config(plain, {"checkpoint": {"load_universal": True}}, dp_size=1)
    for stage in (1, 2):
        check_layout(config, 1, 1, stage)
    for stage in (0, 3):  # stage 0 has no optimizer partitions; stage 3's loading is not tested here
        expected = f"needs ZeRO stage 1 or 2, this run.s ds_config has ZeRO stage {stage} "
        with pytest.raises(ArgumentError, match=expected):
            check_layout(config, 1, 1, stage)


def test_a_resume_into_a_save_that_holds_later_steps_is_refused(tmp_path):
    """A universal checkpoint of an earlier iteration keeps its run's id: resumed into the --save of that run,
    its steps would replace the later checkpoints there. Refused unless --overwrite."""
    from megatron_subnet.training.checkpoint import ResumeError, check_save_dir

    save = tmp_path / "save"
    for iteration in (3, 6):
        _checkpoint(save, iteration, run_id="run")
    later = "holds iter_0000006, later than the checkpoint this run resumes from .iteration 3. in another directory"
    with pytest.raises(ResumeError, match=later):
        check_save_dir(str(save), str(tmp_path / "universal"), "run", False, resumes_at=3)
    check_save_dir(str(save), str(tmp_path / "universal"), "run", True, resumes_at=3)
    check_save_dir(str(save), str(save), "run", False, resumes_at=3)  # --load X --save X redoes its later steps


def test_pruning_never_deletes_a_universal_checkpoint(tmp_path):
    """A run resumed from a universal checkpoint and saving into its directory (same run id) prunes its own
    checkpoints, never the universal one."""
    from megatron_subnet.training.checkpoint import _prune

    save = _checkpoint(tmp_path / "save", 3, run_id="run", universal={"from": "x"})
    for iteration in (4, 5, 6):
        _checkpoint(save, iteration, run_id="run")
    _prune(save, "run", keep_last=1)
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003", "iter_0000006"]
