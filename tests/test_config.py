"""The trainer's typed configuration: the flags map one to one onto its fields, its checks across flags."""

from __future__ import annotations

import json

import pytest

from megatron_subnet.arguments import build_parser, parse_config
from megatron_subnet.training.config import ArgumentError, TrainConfig, check_layout, reconcile_ds_config


@pytest.fixture
def argv(tmp_path) -> list[str]:
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    (tmp_path / "student.json").write_text("{}")
    return [
        "--ds_config", str(tmp_path / "ds.json"), "--data-path", "data", "--micro-batch-size", "2",
        "--train-iters", "10", "--init", "random", "--model-config", str(tmp_path / "student.json"),
        "--kd-alpha", "0",
    ]  # fmt: skip


def test_every_flag_is_one_field_and_flat_gives_the_flags_back(argv):
    """A checkpoint records ``flat()`` and a resume compares it: its keys are the parser's, its values the
    parsed flags (the implied ones filled in)."""
    namespace = vars(build_parser().parse_args(argv + ["--recompute-activations", "--bf16"]))
    config = parse_config(argv + ["--recompute-activations", "--bf16"])
    assert config.flat().keys() == namespace.keys()
    implied = {"recompute_granularity": "selective", "teacher_dtype": "bf16"}
    assert config.flat() == {**namespace, **implied}
    assert TrainConfig.from_flat(config.flat()) == config
    assert config.parallel.tensor_model_parallel_size == 1 and config.batch.micro_batch_size == 2
    with pytest.raises(ArgumentError, match="unknown settings: typo_flag"):
        TrainConfig.from_flat({**config.flat(), "typo_flag": 1})


def test_replace_changes_one_section_and_leaves_the_config_alone(argv):
    config = parse_config(argv)
    moved = config.replace("model", parent_load="elsewhere")
    assert moved.model.parent_load == "elsewhere" and config.model.parent_load is None
    assert moved.flat() == {**config.flat(), "parent_load": "elsewhere"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "1e-3", "--min-lr", "1e-2"], "--lr 0.001 / --min-lr 0.01: need 0 <= min-lr <= lr"),
        (["--virtual-pipeline-model-parallel-size", "2"], "needs --pipeline-model-parallel-size >= 2"),
        (["--lr-decay-style", "wsd"], "--lr-decay-style wsd needs --lr-wsd-decay-iters"),
        (["--train-tokens", "100"], "give exactly one of --train-iters and --train-tokens"),
        (["--kd-alpha", "0.5"], "--kd-alpha 0.5 needs a teacher"),
    ],
)
def test_checks_across_flags_are_one_error_naming_them(argv, extra, message):
    with pytest.raises(ArgumentError, match=message.replace("(", ".").replace(")", ".")):
        parse_config(argv + extra)


def test_the_first_failing_check_is_reported(argv):
    """Two bad flag combinations: the layout's comes first, as before the configuration was typed."""
    with pytest.raises(ArgumentError, match="--virtual-pipeline"):
        parse_config(argv + ["--virtual-pipeline-model-parallel-size", "2", "--lr-decay-style", "wsd"])


def test_checks_that_need_the_launched_job(argv):
    """Interleaving needs a micro-batch count that is a multiple of the stages; ZeRO-3 cannot compile; the
    pipeline runs ZeRO 0-1, in fp32 or bf16, interleaved or not, whatever the backend."""
    layout = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]
    config = parse_config(argv + layout + ["--global-batch-size", "6"])
    ds_config, plan = reconcile_ds_config(config, {"zero_optimization": {"stage": 1}}, dp_size=1)
    assert (plan.gradient_accumulation_steps, ds_config["train_batch_size"]) == (3, 6)
    with pytest.raises(ArgumentError, match="the 3 micro-batches of a step"):
        check_layout(config, plan.gradient_accumulation_steps, 1, 1)
    for stage in (0, 1):
        check_layout(parse_config(argv + layout + ["--bf16"]), 4, 1, stage)
    with pytest.raises(ArgumentError, match="--compile: not supported with ZeRO stage 3"):
        check_layout(parse_config(argv + ["--compile"]), 1, 1, 3)
    with pytest.raises(ArgumentError, match="needs ZeRO stage 0 or 1, this run.s ds_config has ZeRO stage 2 .as Deep"):
        check_layout(parse_config(argv + layout[:2]), 1, 1, 2)


def test_fp16_is_refused_with_its_reason(tmp_path):
    from megatron_subnet.training.ds_config import check_ds_config

    with pytest.raises(ArgumentError, match="ds.json: fp16 is not supported .DeepSpeed's fp16 mode does not run"):
        check_ds_config({"fp16": {"enabled": True}}, str(tmp_path / "ds.json"))
    check_ds_config({"fp16": {"enabled": False}, "bf16": {"enabled": True}}, str(tmp_path / "ds.json"))
