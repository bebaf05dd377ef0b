"""Pipeline parallelism end to end: PP=2, PP=4, TP=2 x PP=2 and TP=2 x PP=2 x DP=2 training with a teacher
equal one process (losses of 5 steps and the final parameters), on tied and untied llama and GPT-NeoX, and
PP=2 with 2 virtual stages each (interleaved 1F1B, stopped after step 3 and resumed); in bf16, PP=2,
TP=2 x PP=2 and 2 virtual stages track the one-process bf16 run within 1% a step;
the tied embedding's two copies stay bit-identical; uneven stages; every launcher (deepspeed, mpirun, and
torchrun on two "nodes" on loopback) runs a TP=2 x PP=2 job; a resume is bit-exact, also after one
stage's process is SIGKILLed mid-step; impossible layouts are one line each.

Every run is a subprocess with a hard timeout (tests/training_utils.py). The runs are made once per module;
the comparison runs start their processes with ``tests/spawn.py`` (torchrun's environment, not its start-up),
the launcher tests with the deepspeed launcher, mpirun and torchrun.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import free_port
from tests.tiny_models import tiny
from tests.training_utils import (
    BIN,
    EXAMPLES,
    WRAPPER,
    base_env,
    build_workspace,
    deepspeed_shm_files,
    latest_tag,
    python_cmd,
    read_jsonl,
    run,
    run_many,
    spawn_cmd,
    torchrun_cmd,
    train_records,
)

pytestmark = pytest.mark.slow  # end-to-end runs of the entry points (make test-fast leaves them out)

ITERS = 5


def ok(result):
    assert result.returncode == 0, result.tail()
    return result


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The training workspace plus untied-llama and GPT-NeoX teachers, and students that split over 2 TP ranks
    and 4 stages (4 layers, 2 query groups of 1 head, MLP 64), an uneven one (layers 0, 2, 3)."""
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import load_config, save_checkpoint

    root = build_workspace(tmp_path_factory.mktemp("pipeline"))
    teachers = {
        "untied": tiny(
            "llama", vocab_size=128, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
            head_dim=16, ffn_hidden_size=128, tie_word_embeddings=False,
        ),
        "neox": tiny(
            "gpt_neox", vocab_size=128, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=4,
            head_dim=16, ffn_hidden_size=128,
        ),
    }  # fmt: skip
    for i, (name, kwargs) in enumerate(teachers.items()):
        torch.manual_seed(i + 1)
        config = ModelConfig(**kwargs)
        save_checkpoint(root / f"teacher_{name}", config, GPTModel(config).state_dict())
    for name in ("teacher", "teacher_untied", "teacher_neox"):
        parent = load_config(root / name)
        subnet = SubnetConfig.from_counts(
            parent, num_layers=4, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64
        )
        subnet.save(root / f"subnet_pp_{name}.json")
    uneven = json.loads((root / "subnet_pp_teacher.json").read_text())
    uneven = {k: [v[i] for i in (0, 2, 3)] if k != "hidden" else v for k, v in uneven.items()}
    uneven["layers"] = [0, 2, 3]
    (root / "subnet_uneven.json").write_text(json.dumps(uneven))
    return root


def flags(ws: Path, teacher: str = "teacher", subnet: str | None = None, stage: int = 1) -> list[str]:
    return [
        "--ds_config", f"{ws}/zero{stage}.json",
        "--teacher-load", f"{ws}/{teacher}",
        "--subnet", str(ws / (subnet or f"subnet_pp_{teacher}.json")),
        "--data-path", f"{ws}/data", "--split", "80,10,10",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", str(ITERS), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
        "--seed", "1234", "--log-interval", "1", "--eval-interval", str(ITERS), "--eval-iters", "1",
    ]  # fmt: skip


def layout(tp: int = 1, pp: int = 1) -> list[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def launcher(kind: str, nproc: int, argv: list[str], port: int) -> tuple[list, dict]:
    script = {"deepspeed": "launch_deepspeed.sh", "mpirun": "launch_mpirun.sh"}[kind]
    env = {"deepspeed": {"NUM_GPUS": str(nproc)}, "mpirun": {"NP": str(nproc)}}[kind]
    return ["bash", EXAMPLES / script, *argv], {**env, "MASTER_PORT": str(port), "PYTHON": str(BIN / "python")}


@pytest.fixture(scope="module")
def runs(ws) -> dict[str, Path]:
    """Every comparison run, each saving its final model: references on one process, then the layouts."""
    out = {name: ws / f"run_{name}" for name in (
        "ref", "pp2", "pp4", "tp2pp2", "tp2pp2dp2", "untied_ref", "untied_pp2", "neox_ref", "neox_pp2",
        "uneven_ref", "uneven_pp2", "pp2v2")}  # fmt: skip

    def save(name: str) -> list[str]:
        return ["--save", str(out[name] / "ckpt"), "--log-dir", str(out[name])]

    uneven = flags(ws, subnet="subnet_uneven.json") + layout(pp=2) + ["--pipeline-layer-split", "1,2"]
    # interleaved: 4 layers over 2 x 2 virtual stages; a job stopped after the checkpoint of step 3, then resumed
    interleaved = flags(ws) + layout(pp=2) + ["--virtual-pipeline-model-parallel-size", "2"] + save("pp2v2")
    dump = {"state_dump": str(out["pp2"] / "state_dump"), "device_trace": str(out["pp2"] / "device_trace")}
    jobs = [  # independent: two at a time (a job's start-up leaves the cores idle in places)
        (spawn_cmd(4, flags(ws) + layout(pp=4) + save("pp4")), ws, None, 400, None),
        (spawn_cmd(2, interleaved + ["--save-interval", "3"]), ws, None, 300, {"stop_after_save": 3}),
        (spawn_cmd(2, flags(ws) + layout(pp=2) + save("pp2")), ws, None, 300, dump),
        (spawn_cmd(2, flags(ws, "teacher_untied") + layout(pp=2) + save("untied_pp2")), ws, None, 300, None),
        (spawn_cmd(2, flags(ws, "teacher_neox") + layout(pp=2) + save("neox_pp2")), ws, None, 300, None),
        (spawn_cmd(2, uneven + save("uneven_pp2")), ws, None, 300, None),
        (python_cmd(flags(ws) + save("ref")), ws, None, 300, None),
        (python_cmd(flags(ws, "teacher_untied") + save("untied_ref")), ws, None, 300, None),
        (python_cmd(flags(ws, "teacher_neox") + save("neox_ref")), ws, None, 300, None),
        (python_cmd(flags(ws, subnet="subnet_uneven.json") + save("uneven_ref")), ws, None, 300, None),
    ]
    for result in run_many(jobs):
        ok(result)
    ok(run(spawn_cmd(2, interleaved + ["--load", str(out["pp2v2"] / "ckpt")]), ws,
           hooks={"state_dump": str(out["pp2v2"] / "state_dump")}, timeout=300))  # fmt: skip
    # the deepspeed and mpirun launchers each run a TP=2 x PP=2 job (torchrun does below, on two "nodes")
    for name, kind, nproc in (("tp2pp2", "deepspeed", 4), ("tp2pp2dp2", "mpirun", 8)):
        port = free_port()
        cmd, env = launcher(kind, nproc, flags(ws) + layout(2, 2) + save(name), port)
        try:
            ok(run(cmd, ws, env=env, timeout=600))
        finally:
            for path in deepspeed_shm_files(port):
                path.unlink(missing_ok=True)
    return out


def assert_same_run(run_dir: Path, ref_dir: Path, what: str) -> None:
    """The losses, CE and KD parts, lr and grad norm of every step within 1e-5 relative, the final parameters
    within 1e-5."""
    from megatron_subnet.model.weights import load_checkpoint

    got, ref = train_records(run_dir), train_records(ref_dir)
    assert sorted(got) == sorted(ref) == list(range(1, ITERS + 1)), what
    for i in ref:
        for key in ("loss", "ce", "lr", "grad_norm"):
            assert got[i][key] == pytest.approx(ref[i][key], rel=1e-5), (what, i, key)
        assert got[i]["kd"] == pytest.approx(ref[i]["kd"], rel=1e-4, abs=1e-7), (what, i, "kd")
    _, final = load_checkpoint(run_dir / "ckpt" / "final_model")
    _, expected = load_checkpoint(ref_dir / "ckpt" / "final_model")
    assert final.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-5, msg=f"{what}: {key}")


@pytest.mark.parametrize(
    "name, ref",
    [("pp2", "ref"), ("pp4", "ref"), ("tp2pp2", "ref"), ("tp2pp2dp2", "ref"), ("untied_pp2", "untied_ref"),
     ("neox_pp2", "neox_ref"), ("uneven_pp2", "uneven_ref"), ("pp2v2", "ref")],
)  # fmt: skip
def test_pipeline_layouts_equal_one_process(runs, name, ref):
    """PP=2 and PP=4, TP=2 x PP=2 (deepspeed launcher), TP=2 x PP=2 x DP=2 (8 processes, mpirun) at
    ZeRO-1 with distillation; untied llama and GPT-NeoX at PP=2; 3 kept parent layers split 1 + 2; PP=2 x 2
    virtual stages (interleaved), resumed after step 3. The validation and test losses (through the
    forward-only schedules) equal too, where the data-parallel size (and so the evaluation batches) is the
    reference's."""
    assert_same_run(runs[name], runs[ref], name)
    meta = json.loads((runs[name] / "ckpt" / f"iter_{ITERS:07d}" / "megatron_subnet.json").read_text())
    pp = {"pp4": 4, "ref": 1}.get(name, 2)
    assert meta["layout"]["pipeline_model_parallel_size"] == pp
    assert meta["layout"]["virtual_pipeline_model_parallel_size"] == (2 if name == "pp2v2" else 1)
    if name == "tp2pp2dp2":
        return
    got, expected = ({key: [r[key] for r in read_jsonl(d / "metrics.jsonl") if key in r]
                      for key in ("valid_loss", "test_loss")} for d in (runs[name], runs[ref]))  # fmt: skip
    assert len(got["valid_loss"]) == 2 and len(got["test_loss"]) == 1, (name, got)  # before step 1, after step 5
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), (name, key)


def test_tied_embedding_copies_stay_bit_identical(runs):
    """After 5 steps at PP=2 the first stage's embedding and the last stage's copy are bit-identical, and equal
    the one-process run's embedding."""
    from safetensors.torch import load_file

    from megatron_subnet.model.weights import load_checkpoint

    first = load_file(runs["pp2"] / "state_dump" / "rank_0.safetensors")
    last = load_file(runs["pp2"] / "state_dump" / "rank_1.safetensors")
    assert torch.equal(first["embedding.weight"], last["embedding.weight"])
    assert not set(first) - {"embedding.weight"} & set(last)  # no layer on both stages
    assert any(k.startswith("layers.") for k in first) and "final_layernorm.weight" in last
    _, expected = load_checkpoint(runs["ref"] / "ckpt" / "final_model")
    torch.testing.assert_close(first["embedding.weight"], expected["embedding.weight"], rtol=1e-5, atol=1e-6)


BF16_ITERS, BF16_REL = 10, 0.01  # the suite's bf16 bound (tests/test_precision_and_speed.py): 1% a step


@pytest.fixture(scope="module")
def bf16_runs(ws) -> dict[str, Path]:
    """10 distillation steps in bf16 (student and teacher; DeepSpeed's bf16 mode: fp32 master weights and
    optimizer state) on one process and through the pipeline: PP=2 at ZeRO-1, TP=2 x PP=2 and PP=2 x 2 virtual
    stages at ZeRO-0 (where the step takes the gradient norm: DeepSpeed's bf16 optimizer there counts
    replicated tensors again), GPT-NeoX at PP=2 (ZeRO-1), each against one process at the same ZeRO stage
    (DeepSpeed's bf16 optimizers of ZeRO-0 and -1 accumulate and round apart); each stage holding a tied copy
    hashes it after every step."""
    names = ("ref", "ref_z0", "pp2", "tp2pp2", "pp2v2", "neox_ref", "neox_pp2")
    out = {name: ws / f"bf16_{name}" for name in names}

    for stage in (0, 1):
        config = json.loads((ws / f"zero{stage}.json").read_text())
        (ws / f"bf16_zero{stage}.json").write_text(json.dumps({**config, "bf16": {"enabled": True}}))

    def argv(name: str, teacher: str = "teacher", stage: int = 1) -> list[str]:
        return flags(ws, teacher) + [
            "--ds_config", str(ws / f"bf16_zero{stage}.json"), "--bf16", "--train-iters", str(BF16_ITERS),
            "--eval-interval", str(BF16_ITERS), "--log-dir", str(out[name]),
        ]  # fmt: skip

    def tied(name: str) -> dict:
        return {"tied_trace": str(out[name] / "tied")}

    jobs = [
        (spawn_cmd(4, argv("tp2pp2", stage=0) + layout(2, 2)), ws, None, 400, tied("tp2pp2")),
        (python_cmd(argv("ref")), ws, None, 300, None),
        (python_cmd(argv("ref_z0", stage=0)), ws, None, 300, None),
        (spawn_cmd(2, argv("pp2") + layout(pp=2)), ws, None, 300, tied("pp2")),
        (spawn_cmd(2, argv("pp2v2", stage=0) + layout(pp=2) + ["--virtual-pipeline-model-parallel-size", "2"]), ws,
         None, 300, tied("pp2v2")),
        (python_cmd(argv("neox_ref", "teacher_neox")), ws, None, 300, None),
        (spawn_cmd(2, argv("neox_pp2", "teacher_neox") + layout(pp=2)), ws, None, 300, None),
    ]  # fmt: skip
    for result in run_many(jobs):
        ok(result)
    return out


@pytest.mark.parametrize(
    "name, ref", [("pp2", "ref"), ("tp2pp2", "ref_z0"), ("pp2v2", "ref_z0"), ("neox_pp2", "neox_ref")]
)
def test_bf16_through_the_pipeline_tracks_one_process(bf16_runs, runs, name, ref):
    """Every step's loss, CE and KD parts and gradient norm within 1% of the one-process bf16 run's; the first
    step's loss is not fp32's (bf16 really ran); no step skipped."""
    got, expected = train_records(bf16_runs[name]), train_records(bf16_runs[ref])
    assert sorted(got) == sorted(expected) == list(range(1, BF16_ITERS + 1)), name
    for i in expected:
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert got[i][key] == pytest.approx(expected[i][key], rel=BF16_REL), (name, i, key)
        assert not got[i]["skipped"], (name, i)
    fp32 = train_records(runs["neox_ref" if ref == "neox_ref" else "ref"])
    assert got[1]["loss"] != fp32[1]["loss"], "the first bf16 loss is fp32's: was it bf16?"


@pytest.mark.parametrize("name", ["pp2", "tp2pp2", "pp2v2"])
def test_bf16_tied_copies_stay_bit_identical_after_every_step(bf16_runs, name):
    """The first stage's embedding and the last stage's copy (each tensor-parallel shard) are the same bf16
    bits after every one of the 10 steps: one summed gradient, one update."""
    records = [r for path in (bf16_runs[name] / "tied").glob("rank_*.jsonl") for r in read_jsonl(path)]
    by_shard: dict[tuple, dict[int, set]] = {}
    for r in records:
        by_shard.setdefault((r["iteration"], r["tp"], r["dp"]), {}).setdefault(r["pp"], set()).add(r["weight"])
        assert r["dtype"] == "torch.bfloat16", r
    assert {key[0] for key in by_shard} == set(range(1, BF16_ITERS + 1)), name
    for key, stages in by_shard.items():
        assert sorted(stages) == [0, 1] and stages[0] == stages[1], (name, key, stages)


def test_tied_embedding_sync_runs_on_the_students_device(runs):
    """At PP=2 the first broadcast of the tied embedding (first stage -> last) comes after the student was moved
    to the run's device (``cpu:0`` in the trace), and every tensor broadcast before training lies on the
    engine's device: NCCL moves accelerator tensors only. (On a CPU the device check cannot fail; the order
    check is the one that catches a sync before the move.)"""
    for rank in (0, 1):
        events = json.loads((runs["pp2"] / "device_trace" / f"rank_{rank}.json").read_text())
        assert events[-1][0] == "engine" and ["to", "cpu:0"] in events, events
        broadcasts = [i for i, (kind, _) in enumerate(events) if kind == "broadcast"]
        assert broadcasts and events.index(["to", "cpu:0"]) < broadcasts[0], events
        assert all(events[i][1] == events[-1][1] for i in broadcasts), events


def test_interleaved_stages_hold_their_virtual_stages_and_tied_copies_agree(runs):
    """PP=2 x 2 virtual stages of 4 layers: rank 0 holds virtual stages 0 and 2 (layers 0 and 2) and the
    embedding, rank 1 virtual stages 1 and 3 (layers 1 and 3), the final norm and the tied embedding's copy,
    which is bit-identical to rank 0's after a resumed run and equals the one-process run's."""
    from safetensors.torch import load_file

    from megatron_subnet.model.weights import load_checkpoint

    first = load_file(runs["pp2v2"] / "state_dump" / "rank_0.safetensors")
    last = load_file(runs["pp2v2"] / "state_dump" / "rank_1.safetensors")
    assert {k.split(".")[1] for k in first if k.startswith("layers.")} == {"0", "2"}
    assert {k.split(".")[1] for k in last if k.startswith("layers.")} == {"1", "3"}
    assert "final_layernorm.weight" in last and "final_layernorm.weight" not in first
    assert torch.equal(first["embedding.weight"], last["embedding.weight"])
    _, expected = load_checkpoint(runs["ref"] / "ckpt" / "final_model")
    torch.testing.assert_close(first["embedding.weight"], expected["embedding.weight"], rtol=1e-5, atol=1e-6)


def test_uneven_stages_hold_the_layers_they_were_given(runs):
    """--pipeline-layer-split 1,2 of the kept layers 0, 2, 3: stage 0 trains the student's layer 0 (the
    parent's 0), stage 1 its layers 1-2 (the parent's 2, 3); the final model records the sub-network."""
    subnet = json.loads((runs["uneven_pp2"] / "ckpt" / "final_model" / "subnet.json").read_text())
    assert subnet["layers"] == [0, 2, 3]
    from megatron_subnet.parallel.pipeline import split_layers, stage_of

    assert [stage_of([1, 2], r).layers for r in (0, 1)] == [(0,), (1, 2)]
    assert split_layers(17, 2) == [9, 8] and split_layers(30, 4) == [8, 8, 7, 7]
    assert split_layers(10, 4, first=1, last=1) == [1, 4, 4, 1]


def test_sigkill_of_one_stage_stops_the_job_and_it_resumes(ws, runs, tmp_path):
    """PP=2, checkpoints every 2 steps: stage 1's process SIGKILLed in the middle of step 3. torchrun stops the
    job within the timeout (no hang); --load resumes from iter_0000002 and steps 3-5 equal the uninterrupted
    PP=2 run's exactly."""
    save = tmp_path / "ckpt"
    argv = flags(ws) + layout(pp=2) + ["--save", str(save), "--save-interval", "2"]
    start = time.monotonic()
    killed = run(torchrun_cmd(2, argv + ["--log-dir", str(tmp_path / "a")]), tmp_path,
                 hooks={"kill_in_step": {"iteration": 3, "rank": 1}}, timeout=150)  # fmt: skip
    assert killed.returncode not in (0, None), killed.tail()
    assert time.monotonic() - start < 150
    assert latest_tag(save) == "iter_0000002"
    ok(run(torchrun_cmd(2, argv + ["--load", str(save), "--log-dir", str(tmp_path / "b")]), tmp_path, timeout=300))
    resumed, reference = train_records(tmp_path / "b"), train_records(runs["pp2"])
    assert sorted(resumed) == [3, 4, 5]
    for key in ("loss", "ce", "kd", "grad_norm", "lr"):
        assert [resumed[i][key] for i in (3, 4, 5)] == [reference[i][key] for i in (3, 4, 5)], key


def two_node_job(argv: list[str], cwd: Path, hooks: dict | None = None, timeout: float = 400) -> list:
    """TP=2 x PP=2 on two torchrun "nodes" of 2 processes each, meeting through c10d on 127.0.0.1."""
    port = free_port()
    env = base_env({"MEGATRON_SUBNET_TEST_HOOKS": json.dumps(hooks or {})})
    procs = []
    for node in range(2):
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job{port}",
               str(WRAPPER), *argv]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))  # fmt: skip
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, out, err))
    return results


def test_two_torchrun_nodes_train_and_resume(ws, runs, tmp_path):
    """Two torchrun processes (--nnodes 2, rendezvous on 127.0.0.1) run TP=2 x PP=2: stopped after the
    checkpoint of step 3 and resumed the same way, every step equals the one-node TP=2 x PP=2 run's (under
    the deepspeed launcher) exactly."""
    save = tmp_path / "ckpt"
    argv = flags(ws) + layout(2, 2) + ["--save", str(save), "--save-interval", "3"]
    for code, _out, err in two_node_job(argv + ["--log-dir", str(tmp_path / "a")], tmp_path, {"stop_after_save": 3}):
        assert code == 0, err[-3000:]
    assert latest_tag(save) == "iter_0000003"
    for code, _out, err in two_node_job(argv + ["--load", str(save), "--log-dir", str(tmp_path / "b")], tmp_path):
        assert code == 0, err[-3000:]
    got = {**train_records(tmp_path / "a"), **train_records(tmp_path / "b")}
    reference = train_records(runs["tp2pp2"])
    assert sorted(got) == list(range(1, ITERS + 1))
    for key in ("loss", "ce", "kd", "grad_norm", "lr"):
        assert [got[i][key] for i in sorted(got)] == [reference[i][key] for i in sorted(reference)], key


def test_impossible_layouts_are_one_line_each(ws, tmp_path):
    """More stages than kept layers, a split that does not sum to them, a world that TP x PP does not divide,
    ZeRO-2 with stages, more virtual stages than layers, micro-batches that are no multiple of the stages
    (interleaved), virtual stages without stages: every rank says so in one line, before any work."""
    one_layer = json.loads((ws / "subnet_pp_teacher.json").read_text())
    one_layer = {k: v[:1] if k != "hidden" else v for k, v in one_layer.items()}
    (tmp_path / "one_layer.json").write_text(json.dumps(one_layer))
    cases = [
        (2, flags(ws, subnet=str(tmp_path / "one_layer.json")) + layout(pp=2), "more stages than the 1 layers"),
        (2, flags(ws) + layout(pp=2) + ["--pipeline-layer-split", "1,1"], "--pipeline-layer-split 1,1"),
        (3, flags(ws) + layout(pp=2), "world size 3 is not divisible by --tensor-model-parallel-size 1 x "
                                      "--pipeline-model-parallel-size 2"),
        (2, flags(ws, stage=2) + layout(pp=2), "ZeRO stage 2"),
        (2, flags(ws) + layout(pp=2) + ["--virtual-pipeline-model-parallel-size", "3"],
         "--pipeline-model-parallel-size 2 x --virtual-pipeline-model-parallel-size 3: more stages than the 4 layers"),
        (2, flags(ws) + layout(pp=2) + ["--virtual-pipeline-model-parallel-size", "2", "--global-batch-size", "3"],
         "the 3 micro-batches of a step"),
        (1, flags(ws) + ["--virtual-pipeline-model-parallel-size", "2"], "needs --pipeline-model-parallel-size >= 2"),
    ]
    jobs = [(spawn_cmd(n, argv), tmp_path, None, 120, None) for n, argv, _ in cases]
    for result, (_, _, needle) in zip(run_many(jobs), cases):
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode != 0 and "megatron_subnet/" not in result.stderr, result.tail()
        assert len(lines) == 1 and needle in lines[0], result.tail()  # once: rank 0


def test_resume_at_another_virtual_size_is_refused(ws, runs, tmp_path):
    """The interleaved run's checkpoint (2 virtual stages) resumed as plain 1F1B: one line naming both sizes,
    before any work."""
    argv = flags(ws) + layout(pp=2) + ["--load", str(runs["pp2v2"] / "ckpt"), "--save", str(tmp_path / "ckpt"),
                                       "--log-dir", str(tmp_path)]  # fmt: skip
    result = run(spawn_cmd(2, argv), tmp_path, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    needle = "virtual_pipeline_model_parallel_size=2, this launch has virtual_pipeline_model_parallel_size=1"
    assert result.returncode != 0 and len(lines) == 1 and needle in lines[0], result.tail()  # once: rank 0
    assert not (tmp_path / "ckpt").exists()


def test_resume_with_another_layer_split_is_refused_naming_the_flag(ws, runs, tmp_path):
    """The 1 + 2 split's checkpoint resumed with the even split (2 + 1), or with another given one: one line
    saying which split the checkpoint holds and which flag resumes it, before any work (not DeepSpeed's state
    dict errors)."""
    load = ["--load", str(runs["uneven_pp2"] / "ckpt"), "--save", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path)]
    base = flags(ws, subnet="subnet_uneven.json") + layout(pp=2) + load
    for extra in ([], ["--pipeline-layer-split", "2,1"]):
        result = run(spawn_cmd(2, base + extra), tmp_path, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        needle = "stages hold 1,2 layers, this launch splits them 2,1; resume with --pipeline-layer-split 1,2"
        assert result.returncode != 0 and len(lines) == 1 and needle in lines[0], result.tail()  # once: rank 0
        assert "Traceback" not in result.stderr and not (tmp_path / "ckpt").exists()
