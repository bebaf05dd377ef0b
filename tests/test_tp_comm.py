"""benchmarks/tp_comm.py's byte counter at TP=2 on tiny models: the model's forward and backward all-reduce exactly
Megatron's analytical volume (per layer one b*s*h after attention and one after the MLP, forward and backward,
plus the embedding and the output layer), the loss no more than Megatron's vocab-parallel CE, and nothing else
crosses ranks. No timing."""

from __future__ import annotations

import pytest

from benchmarks.tp_comm import count_one_step, llama_config, megatron_bytes
from tests.distributed import run_distributed

BATCH, SEQ = 2, 8


def _spec(activation: str, tied: bool, teacher: bool) -> dict:
    student = llama_config(64, 16, 2, 4, 2, 32, SEQ, tied)
    student["activation"] = activation
    return {
        "student": student,
        "teacher": llama_config(64, 24, 3, 4, 2, 48, SEQ, tied) if teacher else None,
        "batch": BATCH,
        "seq": SEQ,
        "seed": 0,
    }


CASES = {  # name: (spec, KD step)
    "gelu_tied_ce": (_spec("gelu", True, False), False),
    "gelu_untied_kd": (_spec("gelu", False, True), True),
    "swiglu_tied_ce": (_spec("swiglu", True, False), False),
}


def _count_all(rank: int, cases: dict) -> dict:
    return {name: count_one_step(rank, spec, kd) for name, (spec, kd) in cases.items()}


@pytest.fixture(scope="module")
def counted() -> dict:
    per_rank = run_distributed(_count_all, 2, tensor_parallel=2, args=(CASES,))
    assert per_rank[0] == per_rank[1]  # the same bytes (and loss) on both ranks
    return {name: per_rank[0][name]["phases"] for name in CASES}


def _check(phases: dict, spec: dict, kd: bool) -> None:
    reference = megatron_bytes(spec["student"], BATCH, SEQ, spec["teacher"] if kd else None)
    kinds = {kind for entry in phases.values() for kind in entry["kinds"]}
    assert kinds == {"all_reduce"}
    assert set(phases) <= {"teacher forward", "forward", "loss", "backward"}  # the optimizer step sends nothing
    model = ["forward", "backward"] + (["teacher forward"] if kd else [])
    assert {p: phases[p]["bytes"] for p in model} == {p: reference[p] for p in model}
    assert 0 < phases["loss"]["bytes"] <= reference["loss"]


@pytest.mark.parametrize("name", ["gelu_tied_ce", "gelu_untied_kd"])
def test_all_reduce_bytes_equal_megatron(counted, name):
    spec, kd = CASES[name]
    _check(counted[name], spec, kd)


def test_gated_mlp_all_reduce_bytes_equal_megatron(counted):
    """SwiGLU's fc1 and gate share one copy of their input into the TP region: one gradient all-reduce."""
    spec, kd = CASES["swiglu_tied_ce"]
    _check(counted["swiglu_tied_ce"], spec, kd)
