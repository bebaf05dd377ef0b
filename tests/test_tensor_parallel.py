"""Tensor parallelism: TP=2 and TP=4 (gloo processes) equal one process. Logits of the dense model and of 20+
masked sub-networks (kept heads placed unevenly, or on one rank only), the loss and every parameter
gradient after a backward pass, and Megatron-style random init; plus the sharded checkpoint round trip."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import (
    CheckpointReader,
    load_model,
    merge_state_dicts,
    model_from_state,
    partition_dims,
    save_checkpoint,
    shard_state_dict,
)
from megatron_subnet.parallel.layers import TPShard
from megatron_subnet.parallel.mappings import gather_from_tensor_model_parallel_region
from tests.distributed import run_distributed
from tests.test_subnet import random_subnet
from tests.tiny_models import tiny

VOCAB = 64
CONFIGS = {
    "llama_gqa_tied": tiny(
        "llama", vocab_size=VOCAB, hidden_size=24, num_layers=3, num_attention_heads=8, num_query_groups=4,
        head_dim=6, ffn_hidden_size=32, tie_word_embeddings=True, init_std=0.3,
    ),
    "qwen2_bias_untied": tiny(
        "qwen2", vocab_size=VOCAB, hidden_size=24, num_layers=2, num_attention_heads=4, num_query_groups=4,
        head_dim=6, ffn_hidden_size=16, init_std=0.3,
    ),
    "llama_every_bias": tiny(
        "llama", vocab_size=VOCAB, hidden_size=16, num_layers=2, num_attention_heads=8, num_query_groups=4,
        head_dim=4, ffn_hidden_size=24, qkv_bias=True, proj_bias=True, mlp_bias=True, init_std=0.3,
    ),
    "gpt_neox": tiny(
        "gpt_neox", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=4,
        head_dim=8, ffn_hidden_size=48, init_std=0.3,
    ),
}  # fmt: skip
SUBNETS_PER_CONFIG = 6


def parent_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Large random weights with non-trivial norms and biases, so that every index matters."""
    torch.manual_seed(seed)
    model = GPTModel(config, TPShard())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def uneven_subnets(config: ModelConfig) -> list[SubnetConfig]:
    """Kept groups all in the first half, all in the last quarter, and one group only: some TP ranks keep no head."""
    out = []
    groups = config.layer_query_groups(0)
    per_group = config.layer_heads(0) // groups
    for kept in ([0, 1] if groups > 2 else [0], [groups - 1], [1]):
        out.append(
            SubnetConfig(
                layers=list(range(config.num_layers)),
                hidden=list(range(0, config.hidden_size, 2)),
                heads=[[g * per_group for g in kept]] * config.num_layers,
                query_groups=[kept] * config.num_layers,
                mlp=[list(range(config.layer_ffn(0) // 2))] * config.num_layers,  # neurons of the first ranks only
            )
        )
    return out


def cases() -> dict[str, tuple[dict, dict, list[SubnetConfig], torch.Tensor]]:
    rng = random.Random(0)
    out = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        config = ModelConfig(**kwargs)
        subnets = uneven_subnets(config) + [random_subnet(config, rng) for _ in range(SUBNETS_PER_CONFIG)]
        tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(i))
        out[name] = (kwargs, parent_state(config, i), subnets, tokens)
    return out


def forward_and_grads(model: GPTModel, subnets: list[SubnetConfig], tokens: torch.Tensor) -> dict:
    """Full-vocabulary logits (dense and masked), the loss and this rank's gradients."""
    gather = gather_from_tensor_model_parallel_region
    with torch.no_grad():
        logits = [gather(model(tokens[:, :-1]))] + [gather(model(tokens[:, :-1], subnet=s)) for s in subnets]
    model.train()
    loss = F.cross_entropy(gather(model(tokens[:, :-1])).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.item(), "grads": grads}


def _run_tp(rank: int, all_cases: dict) -> dict:
    out = {}
    for name, (kwargs, state, subnets, tokens) in all_cases.items():
        config = ModelConfig(**kwargs)
        shard = TPShard.current()
        model = model_from_state(config, {k: v.clone() for k, v in shard_state_dict(config, state, shard).items()})
        out[name] = forward_and_grads(model.requires_grad_(True), subnets, tokens)
    return out


def _init(rank: int, kwargs: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return GPTModel(ModelConfig(**kwargs)).state_dict()


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict]:
    all_cases = cases()
    results = {}
    for name, (kwargs, state, subnets, tokens) in all_cases.items():
        model = model_from_state(ModelConfig(**kwargs), {k: v.clone() for k, v in state.items()}, shard=TPShard())
        results[name] = forward_and_grads(model.requires_grad_(True), subnets, tokens)
    return all_cases, results


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_process(tp, reference):
    all_cases, expected = reference
    ranks = run_distributed(_run_tp, tp, tensor_parallel=tp, args=(all_cases,))
    for name, (kwargs, _, subnets, _) in all_cases.items():
        config = ModelConfig(**kwargs)
        for rank in ranks:
            got = rank[name]
            assert len(got["logits"]) == len(subnets) + 1 >= 9
            for i, (a, b) in enumerate(zip(got["logits"], expected[name]["logits"])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} logits {i} at TP={tp}")
            assert got["loss"] == pytest.approx(expected[name]["loss"], rel=1e-6)
        merged = merge_state_dicts(config, [rank[name]["grads"] for rank in ranks])
        for key, grad in expected[name]["grads"].items():
            torch.testing.assert_close(merged[key], grad, rtol=1e-5, atol=1e-5, msg=f"{name} grad {key} at TP={tp}")
        shards = [rank[name]["grads"] for rank in ranks]
        for key in shards[0]:  # replicated parameters: the same gradient on every rank
            if shards[0][key].shape == expected[name]["grads"][key].shape:
                assert all(torch.equal(s[key], shards[0][key]) for s in shards), f"{name} {key} differs across ranks"


def test_random_init_at_tp2_is_the_single_process_init():
    kwargs = CONFIGS["llama_every_bias"]
    config = ModelConfig(**kwargs)
    expected = _init(0, kwargs, 7)
    shards = run_distributed(_init, 2, tensor_parallel=2, args=(kwargs, 7))
    merged = merge_state_dicts(config, shards)
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key


def _load_sharded(rank: int, path: str, tokens: torch.Tensor) -> torch.Tensor:
    model = load_model(path)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(tokens))


@pytest.mark.parametrize("saved_at", [1, 2, 4])
def test_each_rank_reads_its_shard_of_any_checkpoint_layout(saved_at, tmp_path):
    """A checkpoint saved consolidated or at TP=2/4: read at TP=2 (slices of the consolidated file, or the
    shard files) it gives the single-process logits; read whole it gives the same tensors."""
    kwargs = CONFIGS["llama_gqa_tied"]
    config = ModelConfig(**kwargs)
    state = parent_state(config)
    save_checkpoint(tmp_path / "ckpt", config, state, tensor_parallel_size=saved_at)
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert reader.tp_size == saved_at
        whole = reader.read_all()
        assert all(torch.equal(whole[k], state[k]) for k in state)
        rows = torch.tensor([1, 5, 9, 40, 63])
        cols = torch.tensor([0, 3])
        assert torch.equal(reader.read("embedding.weight", rows, cols), state["embedding.weight"][rows][:, cols])
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = model_from_state(config, state, shard=TPShard())(tokens)
    got = run_distributed(_load_sharded, 2, tensor_parallel=2, args=(str(tmp_path / "ckpt"), tokens))
    for logits in got:
        torch.testing.assert_close(logits, expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("saved_at", [1, 4])
def test_student_shards_cut_from_checkpoint_slices_equal_the_extracted_student(saved_at, tmp_path):
    """extract_shard through a CheckpointReader (consolidated, or parent saved at TP=4) gives, rank by rank,
    the TP=2 shards of the student that extract_state_dict cuts from the whole parent in memory."""
    from megatron_subnet.model.extract import extract_shard, extract_state_dict

    config = ModelConfig(**CONFIGS["llama_gqa_tied"])
    state = parent_state(config)
    save_checkpoint(tmp_path / "parent", config, state, tensor_parallel_size=saved_at)
    subnet = SubnetConfig(
        layers=[0, 2], hidden=[1, 2, 3, 5, 8, 13, 21, 22], heads=[[2, 5], [0, 7]], query_groups=[[1, 2], [0, 3]],
        mlp=[list(range(0, 32, 2)), list(range(5, 21))],
    )
    student_config, expected = extract_state_dict(config, state, subnet)
    with CheckpointReader(tmp_path / "parent") as reader:
        shards = [extract_shard(config, reader.read, subnet, TPShard(r, 2))[1] for r in range(2)]
        merged = merge_state_dicts(student_config, shards)
        assert merged.keys() == expected.keys()
        for key in expected:
            assert torch.equal(merged[key], expected[key]), key
        odd = SubnetConfig(subnet.layers, subnet.hidden, [[2], [0]], [[1], [0]], subnet.mlp)
        with pytest.raises(ValueError, match="num_query_groups 1 is not divisible by --tensor-model-parallel-size 2"):
            extract_shard(config, reader.read, odd, TPShard(0, 2))


def test_loaded_models_keep_the_split_attributes(tmp_path):
    """load_state_dict(assign=True) makes new Parameters: the loader must mark the split ones again (DeepSpeed's
    gradient norm and the checkpoint merge read them)."""
    config = ModelConfig(**CONFIGS["qwen2_bias_untied"])
    model = model_from_state(config, parent_state(config), shard=TPShard())
    split = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    assert split == {n for n, d in partition_dims(config).items() if d is not None}
    assert "embedding.weight" in split and "layers.0.self_attention.linear_proj.bias" not in split


def _mappings(rank: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each public TP mapping's forward output and its input's gradient under the loss sum(w * y), with a
    rank-dependent weight w, so that every backward sees different gradients on different ranks."""
    from megatron_subnet.parallel import mappings

    out = {}
    for name in ("copy_to", "reduce_from", "scatter_to", "gather_from"):
        fn = getattr(mappings, f"{name}_tensor_model_parallel_region")
        inp = (x * (rank + 1)).requires_grad_()
        y = fn(inp)
        w = torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape) * (rank + 2)
        (grad,) = torch.autograd.grad((w * y).sum(), inp)
        out[name], out[f"{name}.grad"] = y.detach(), grad
    return out


def test_mappings_forward_and_backward_are_duals():
    """copy/reduce/scatter/gather over 2 ranks against what one process computes by hand."""
    x = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    got = run_distributed(_mappings, 2, tensor_parallel=2, args=(x,))
    inputs = [x * 1, x * 2]
    weights = lambda shape, r: torch.arange(torch.Size(shape).numel(), dtype=x.dtype).reshape(shape) * (r + 2)  # noqa: E731
    for r, out in enumerate(got):
        # copy: forward identity; backward the sum of both ranks' gradients
        assert torch.equal(out["copy_to"], inputs[r])
        assert torch.equal(out["copy_to.grad"], weights(x.shape, 0) + weights(x.shape, 1))
        # reduce: forward the sum; backward identity
        assert torch.equal(out["reduce_from"], inputs[0] + inputs[1])
        assert torch.equal(out["reduce_from.grad"], weights(x.shape, r))
        # scatter: forward this rank's half of the last dimension; backward the gathered halves
        assert torch.equal(out["scatter_to"], inputs[r][:, 2 * r : 2 * r + 2])
        assert torch.equal(out["scatter_to.grad"], torch.cat([weights((2, 2), 0), weights((2, 2), 1)], -1))
        # gather: forward both ranks' tensors side by side; backward this rank's half of the gradient
        assert torch.equal(out["gather_from"], torch.cat(inputs, -1))
        assert torch.equal(out["gather_from.grad"], weights((2, 8), r)[:, 4 * r : 4 * r + 4])
