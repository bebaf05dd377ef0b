"""Activation recomputation (``GPTModel.set_recompute``: full / selective) and per-layer torch.compile
(``compile_model``): the same loss and gradients as the plain model, dense and masked, llama and GPT-NeoX,
through pipeline stages and at TP=2; less memory saved for backward; state-dict names kept by compile."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from megatron_subnet.model import gpt
from megatron_subnet.model.compile import compile_model
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel, TransformerLayer
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices
from megatron_subnet.model.weights import merge_state_dicts, model_from_state, shard_state_dict
from megatron_subnet.parallel.layers import TPShard
from megatron_subnet.parallel.mappings import gather_from_tensor_model_parallel_region
from megatron_subnet.parallel.pipeline import PipelineStage
from tests.distributed import run_distributed
from tests.test_tensor_parallel import CONFIGS as TP_CONFIGS
from tests.test_tensor_parallel import parent_state, uneven_subnets
from tests.tiny_models import tiny

VOCAB = 128
CONFIGS = {
    "llama": tiny(
        "llama", vocab_size=VOCAB, hidden_size=64, num_layers=3, num_attention_heads=4, num_query_groups=2,
        head_dim=16, ffn_hidden_size=96, init_std=0.1,
    ),
    "gpt_neox": tiny(
        "gpt_neox", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=4,
        head_dim=16, ffn_hidden_size=128, tie_word_embeddings=True, init_std=0.1,
    ),
}  # fmt: skip
GRANULARITIES = (None, "selective", "full")


def subnet_of(config: ModelConfig) -> SubnetConfig:
    """Fewer layers, hidden channels, query groups / heads and MLP neurons than the parent."""
    return SubnetConfig.from_counts(
        config, num_layers=config.num_layers - 1, hidden_size=40, num_attention_heads=2,
        num_query_groups=1 if config.layer_query_groups(0) < 4 else 2, ffn_hidden_size=48,
    )  # fmt: skip


def tokens_for(seed: int, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq + 1), generator=torch.Generator().manual_seed(seed))


def make_model(name: str) -> GPTModel:
    config = ModelConfig(**CONFIGS[name])
    return model_from_state(config, parent_state(config), shard=TPShard()).requires_grad_(True).train()


def lm_loss(model: GPTModel, tokens: torch.Tensor, subnet=None) -> torch.Tensor:
    logits = gather_from_tensor_model_parallel_region(model(tokens[:, :-1], subnet=subnet))
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient; zeros for one the forward did not use (a layer the sub-network drops)."""
    return {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()
    }


def loss_and_grads(model: GPTModel, tokens: torch.Tensor, subnet=None, granularity=None) -> tuple[float, dict]:
    model.set_recompute(granularity).zero_grad(set_to_none=True)
    loss = lm_loss(model, tokens, subnet)
    loss.backward()
    return loss.item(), grads(model)


def assert_same(got: tuple[float, dict], expected: tuple[float, dict], atol: float, what: str) -> None:
    assert got[0] == pytest.approx(expected[0], rel=0, abs=atol), f"{what}: loss"
    assert got[1].keys() == expected[1].keys()
    for key, grad in expected[1].items():
        torch.testing.assert_close(got[1][key], grad, rtol=0, atol=atol, msg=f"{what}: grad {key}")


# ----------------------------------------------------------------------------- recompute, one process


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_recompute_gives_the_same_loss_and_gradients(name, masked, monkeypatch):
    """Full and selective recomputation: loss and every parameter gradient as without (within 1e-6), and
    the checkpoint really runs: once per kept layer (full) or per attention (selective), in training only."""
    model = make_model(name)
    subnet = subnet_of(model.config) if masked else None
    tokens = tokens_for(1)
    expected = loss_and_grads(model, tokens, subnet)
    calls = []
    real = gpt.checkpoint
    monkeypatch.setattr(gpt, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    layers = len(subnet.layers) if masked else model.config.num_layers
    for granularity in ("full", "selective"):
        calls.clear()
        got = loss_and_grads(model, tokens, subnet, granularity)
        assert_same(got, expected, 1e-6, f"{name} {granularity}")
        assert len(calls) == layers
        assert all(isinstance(fn, TransformerLayer) for fn in calls) == (granularity == "full")
        # eval, or a training forward without grad: nothing is checkpointed, same logits
        calls.clear()
        with torch.no_grad():
            train_logits = model(tokens, subnet=subnet)
            eval_logits = model.eval()(tokens, subnet=subnet)
        model.train()
        assert not calls
        model.set_recompute(None)
        with torch.no_grad():
            torch.testing.assert_close(eval_logits, model(tokens, subnet=subnet), rtol=0, atol=0)
            torch.testing.assert_close(train_logits, eval_logits, rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_through_pipeline_stages(granularity):
    """Two stages in one process: the second takes hidden states that require grad (as received from p2p),
    its input gradient goes back through the first; with recomputation, dense and with sub-network index
    tensors passed in, both stages' gradients equal the whole model's without recomputation."""
    config = ModelConfig(**CONFIGS["llama"])
    state = parent_state(config)
    whole = model_from_state(config, state, shard=TPShard()).requires_grad_(True).train()
    stages = []
    for stage in (PipelineStage((0, 1), True, False), PipelineStage((2,), False, True)):
        part = GPTModel(config, TPShard(), stage)
        part.load_state_dict({k: state[k] for k in part.state_dict()})
        stages.append(part.train().set_recompute(granularity))
    tokens = tokens_for(2)
    subnet = SubnetConfig.from_counts(config, hidden_size=48, num_attention_heads=2, num_query_groups=1)
    for sub in (None, subnet_indices(config, subnet, "cpu", TPShard())):
        expected = loss_and_grads(whole, tokens, sub)
        for part in stages:
            part.zero_grad(set_to_none=True)
        hidden = stages[0](tokens[:, :-1], subnet=sub)
        received = hidden.detach().requires_grad_()
        logits = stages[1](received, subnet=sub)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        hidden.backward(received.grad)
        got = (loss.item(), {**grads(stages[0]), **grads(stages[1])})
        assert_same(got, expected, 1e-6, f"pipeline {granularity} {'masked' if sub else 'dense'}")


def saved_bytes(model: GPTModel, tokens: torch.Tensor, subnet=None) -> int:
    """Bytes of the tensors autograd keeps for backward after one training forward (each storage once,
    parameters excluded). Inside a non-reentrant checkpoint only its inputs are kept (saved through these
    hooks); the tensors its ops save are placeholders, recomputed in backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()  # saved tensors stay alive: no address is reused
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, tokens, subnet)
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_recompute_saves_memory(name):
    """Full < selective < none. Full keeps each layer's input only. Selective drops the core attention's
    saved tensors (rotated q and k, the attention output and its log-sum-exp) for the q/k/v it starts from:
    with CPU SDPA's fused kernel (no [heads, seq, seq] matrix saved) that is a modest saving."""
    model = make_model(name)
    tokens = tokens_for(3, seq=32)
    measured = {}
    for granularity in GRANULARITIES:
        model.set_recompute(granularity)
        measured[granularity] = saved_bytes(model, tokens)
        assert saved_bytes(model, tokens, subnet_of(model.config)) < measured[granularity]
    print(f"{name}: saved bytes", measured)
    assert measured["full"] < measured["selective"] < measured[None], measured
    assert measured["full"] < measured[None] / 3, measured


def test_unknown_granularity_names_the_flag():
    model = make_model("llama")
    with pytest.raises(ValueError, match="--recompute-granularity 'block'"):
        model.set_recompute("block")
    assert model.recompute_granularity is None


# ----------------------------------------------------------------------------- recompute at TP=2


TP_CASES = ("llama_gqa_tied", "gpt_neox")


def tp_cases() -> dict:
    out = {}
    for i, name in enumerate(TP_CASES):
        config = ModelConfig(**TP_CONFIGS[name])
        # kept groups on rank 0 only, and MLP neurons of rank 0 only: rank 1 computes zeros for the all-reduces
        subnets = [None, *uneven_subnets(config)[:2]]
        tokens = torch.randint(0, TP_CONFIGS[name]["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(i))
        out[name] = (TP_CONFIGS[name], parent_state(config, i), subnets, tokens)
    return out


def _run_tp_recompute(rank: int, cases: dict) -> dict:
    out = {}
    for name, (kwargs, state, subnets, tokens) in cases.items():
        config = ModelConfig(**kwargs)
        shard = TPShard.current()
        model = model_from_state(config, {k: v.clone() for k, v in shard_state_dict(config, state, shard).items()})
        model.requires_grad_(True).train()
        for granularity in GRANULARITIES:
            out[name, granularity] = [loss_and_grads(model, tokens, s, granularity) for s in subnets]
    return out


def test_tensor_parallel_with_recompute_equals_one_process_without():
    """TP=2 with full, selective and no recomputation: loss and merged gradients as TP=1 without, dense and two
    sub-networks whose kept heads sit on one rank only and MLP neurons on rank 0 only (a rank keeping nothing
    still runs every all-reduce of forward, backward and recomputation, in order, with zeros)."""
    cases = tp_cases()
    ranks = run_distributed(_run_tp_recompute, 2, tensor_parallel=2, args=(cases,))
    for name, (kwargs, state, subnets, tokens) in cases.items():
        config = ModelConfig(**kwargs)
        model = model_from_state(config, {k: v.clone() for k, v in state.items()}, shard=TPShard())
        model.requires_grad_(True).train()
        expected = [loss_and_grads(model, tokens, s) for s in subnets]
        for granularity in GRANULARITIES:
            for i, (loss, grad) in enumerate(expected):
                what = f"{name} {granularity} subnet {i}"
                for rank in ranks:
                    assert rank[name, granularity][i][0] == pytest.approx(loss, rel=1e-6), what
                merged = merge_state_dicts(config, [rank[name, granularity][i][1] for rank in ranks])
                assert merged.keys() == grad.keys()
                for key in grad:
                    torch.testing.assert_close(merged[key], grad[key], rtol=1e-5, atol=1e-5, msg=f"{what}: {key}")


# ----------------------------------------------------------------------------- compile


def logits_loss_grads(model: GPTModel, tokens: torch.Tensor, subnet, granularity) -> tuple:
    """One training step's logits, loss and gradients (training mode only: an eval or no_grad forward
    would compile another graph)."""
    model.set_recompute(granularity).zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1], subnet=subnet)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return logits.detach(), loss.item(), grads(model)


def test_compiled_layers_equal_eager_and_keep_the_state_dict_names():
    """compile_model (inductor): each TransformerLayer compiled in place, the state-dict keys unchanged;
    logits and gradients equal eager (1e-5) dense, for a sub-network (a new shape: a recompile), and with
    full recomputation of the compiled layers; no graph break."""
    from torch._dynamo.utils import counters

    start = time.perf_counter()
    torch._dynamo.reset()
    counters.clear()
    eager = make_model("llama")
    compiled = make_model("llama")
    keys = list(compiled.state_dict())
    assert compile_model(compiled) is compiled
    assert list(compiled.state_dict()) == keys
    assert all(type(layer) is TransformerLayer for layer in compiled.layers)
    tokens = tokens_for(4, seq=16)
    subnet = subnet_of(compiled.config)
    timings = {}
    for what, sub, granularity in (("dense", None, None), ("masked", subnet, None), ("masked full", subnet, "full")):
        t = time.perf_counter()
        got, expected = (logits_loss_grads(m, tokens, sub, g) for m, g in ((compiled, granularity), (eager, None)))
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5, msg=what)
        assert_same(got[1:], expected[1:], 1e-5, what)
        timings[what] = round(time.perf_counter() - t, 1)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert list(compiled.state_dict()) == keys
    print("compile test timings (s):", timings, "total", round(time.perf_counter() - start, 1))


def _run_tp_compiled(rank: int, kwargs: dict, state: dict, subnet: SubnetConfig, tokens: torch.Tensor) -> list:
    config = ModelConfig(**kwargs)
    shard = TPShard.current()
    model = model_from_state(config, {k: v.clone() for k, v in shard_state_dict(config, state, shard).items()})
    compile_model(model.requires_grad_(True).train())
    return [loss_and_grads(model, tokens, subnet, granularity) for granularity in (None, "full")]


@pytest.mark.slow
def test_compiled_layers_at_tp2_equal_one_process():
    """TP=2, compiled, a sub-network whose heads and MLP neurons all sit on rank 0: rank 0's layers run
    compiled (their all-reduces traced), rank 1's, keeping nothing, eager (see compile.py); loss and merged
    gradients equal the eager TP=1 model's, without and with full recomputation."""
    kwargs = TP_CONFIGS["llama_gqa_tied"]
    config = ModelConfig(**kwargs)
    state = parent_state(config)
    subnet = uneven_subnets(config)[0]
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5)) % kwargs["vocab_size"]
    ranks = run_distributed(_run_tp_compiled, 2, tensor_parallel=2, args=(kwargs, state, subnet, tokens))
    model = model_from_state(config, {k: v.clone() for k, v in state.items()}, shard=TPShard())
    loss, grad = loss_and_grads(model.requires_grad_(True).train(), tokens, subnet)
    for i, granularity in enumerate((None, "full")):
        for rank in ranks:
            assert rank[i][0] == pytest.approx(loss, rel=1e-6), granularity
        merged = merge_state_dicts(config, [rank[i][1] for rank in ranks])
        for key in grad:
            torch.testing.assert_close(merged[key], grad[key], rtol=1e-5, atol=1e-5, msg=f"{granularity}: {key}")
