"""FLOPs per token (model/flops.py) against what torch.utils.flop_counter.FlopCounterMode counts on tiny models.

How FlopCounterMode counts what these models run (torch 2.13, CPU):

- ``F.linear`` (mm / addmm) counts ``2 m n k``; the bias add of addmm is not counted, nor are norms,
  activations, rotary, softmax, ``index_select`` or the embedding lookup.
- ``scaled_dot_product_attention`` on CPU dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
  which FlopCounterMode has no formula for: it counts 0. Its formula for the CUDA kernels (flash, efficient,
  cudnn) is ``sdpa_flop_count``: ``Q K^T`` and ``A V`` dense, not halved for the causal mask. So the tests run
  attention through the MATH backend (two dense ``bmm``s, counted) or give the CPU kernel torch's own formula.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.flops import (
    attention_core_flops_per_token,
    forward_flops_per_token,
    logits_flops_per_token,
    training_flops_per_token,
)
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.subnet import SubnetConfig
from tests.tiny_models import tiny

BATCH, SEQ = 2, 32
BASE = dict(vocab_size=128, hidden_size=64, max_position_embeddings=64)

CONFIGS = {
    "llama_gqa_tied": dict(
        num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=16, ffn_hidden_size=96,
        tie_word_embeddings=True,
    ),
    "llama_untied": dict(num_layers=3, num_attention_heads=8, num_query_groups=2, head_dim=8, ffn_hidden_size=160),
    "qwen2": dict(
        num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=16, ffn_hidden_size=96, qkv_bias=True,
    ),
    "gpt_neox": tiny(
        "gpt_neox", num_layers=2, num_attention_heads=4, num_query_groups=4, head_dim=16, ffn_hidden_size=256,
    ),
    "per_layer": dict(
        num_layers=3, num_attention_heads=[4, 2, 6], num_query_groups=[2, 1, 3], head_dim=8,
        ffn_hidden_size=[96, 64, 32], qkv_bias=True, mlp_bias=True,
    ),
}  # fmt: skip

# The CPU attention kernel, given the formulas FlopCounterMode uses for the CUDA ones.
CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v)
    ),
}


def make(name: str) -> tuple[ModelConfig, GPTModel, torch.Tensor]:
    torch.manual_seed(0)
    config = ModelConfig(**BASE, **CONFIGS[name])
    return config, GPTModel(config), torch.randint(0, config.vocab_size, (BATCH, SEQ))


def counted(model, tokens, subnet=None, backward=False, math=True, custom_mapping=None) -> int:
    """FlopCounterMode's total for a forward (and backward) pass; ``math``: attention as two bmms."""
    with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
        with FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter:
            out = model(tokens, subnet=subnet)
            if backward:
                out.float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_flop_counter(name):
    config, model, tokens = make(name)
    expected = forward_flops_per_token(config, SEQ) * BATCH * SEQ
    assert counted(model, tokens) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "per_layer"])
def test_cpu_attention_kernel(name):
    """The default CPU kernel counts 0 in stock FlopCounterMode; with torch's SDPA formula it counts ours."""
    config, model, tokens = make(name)
    tokens_total = BATCH * SEQ
    expected = forward_flops_per_token(config, SEQ) * tokens_total
    without_attention = expected - attention_core_flops_per_token(config, SEQ) * tokens_total
    # `in`: a later torch that learns the CPU kernel's formula counts it in full
    assert counted(model, tokens, math=False) in (pytest.approx(without_attention), pytest.approx(expected))
    assert counted(model, tokens, math=False, custom_mapping=CPU_SDPA) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "gpt_neox", "per_layer"])
def test_forward_backward_is_three_forwards(name):
    config, model, tokens = make(name)
    forward = counted(model, tokens)
    # Every matmul's backward is two matmuls of its size (input and weight gradients). The first layer's input
    # gradient is computed too (the embedding output requires grad: its weight is trained); only the
    # embedding's own backward (a scatter-add) is no matmul, and its forward counted 0 as well. So exactly 3x.
    assert counted(model, tokens, backward=True) == pytest.approx(3 * forward, rel=0.02)
    expected = training_flops_per_token(config, SEQ) * BATCH * SEQ
    assert counted(model, tokens, backward=True) == pytest.approx(expected, rel=0.02)
    # The fused CPU/CUDA attention kernels' backward recomputes Q K^T: FlopCounterMode counts it 2.5x the
    # attention forward, not 2x, so fwd+bwd = 3 forwards + half an attention-core forward.
    attention = attention_core_flops_per_token(config, SEQ) * BATCH * SEQ
    fused = counted(model, tokens, backward=True, math=False, custom_mapping=CPU_SDPA)
    assert fused == pytest.approx(3 * forward + attention / 2, rel=0.02)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "gpt_neox", "per_layer"])
def test_masked_subnet_counts_as_its_student(name):
    config, model, tokens = make(name)
    n = config.num_layers - 1
    heads = [config.layer_heads(i) // config.layer_query_groups(i) for i in range(n)]  # one group, all its heads
    subnet = SubnetConfig.from_counts(
        config, num_layers=n, hidden_size=40, num_attention_heads=heads, num_query_groups=1,
        ffn_hidden_size=[config.layer_ffn(i) // 2 + i for i in range(n)],
    )  # fmt: skip
    student = subnet.student_config(config)
    expected = forward_flops_per_token(student, SEQ) * BATCH * SEQ
    # The masked path selects weight rows/columns with index_select, which FlopCounterMode does not count (it
    # copies, no multiply-add): the matmuls left have exactly the extracted student's shapes.
    assert counted(model, tokens, subnet=subnet) == pytest.approx(expected, rel=0.02)
    torch.manual_seed(0)
    assert counted(GPTModel(student), tokens) == pytest.approx(expected, rel=0.02)
    assert expected < forward_flops_per_token(config, SEQ) * BATCH * SEQ


def test_formula_by_hand():
    config = ModelConfig(**BASE, **CONFIGS["llama_gqa_tied"])
    h, d, ffn, v = 64, 16, 96, 128
    layer = 2 * h * (4 + 2 * 2) * d + 2 * 4 * d * h + 3 * 2 * h * ffn + 2 * 2 * 4 * d * SEQ
    assert forward_flops_per_token(config, SEQ) == 2 * layer + 2 * h * v
    assert logits_flops_per_token(config) == 2 * h * v
    untied = ModelConfig(**{**BASE, **CONFIGS["llama_gqa_tied"], "tie_word_embeddings": False})
    assert forward_flops_per_token(untied, SEQ) == forward_flops_per_token(config, SEQ)
    # attention grows with the sequence, the rest does not
    assert forward_flops_per_token(config, 2 * SEQ) - forward_flops_per_token(config, SEQ) == 2 * 2 * 2 * 4 * d * SEQ


def test_training_flops_recompute():
    config = ModelConfig(**BASE, **CONFIGS["per_layer"])
    forward = forward_flops_per_token(config, SEQ)
    assert training_flops_per_token(config, SEQ) == 3 * forward
    assert training_flops_per_token(config, SEQ, recompute="full") == 4 * forward - logits_flops_per_token(config)
    selective = training_flops_per_token(config, SEQ, recompute="selective")
    assert selective == 3 * forward + attention_core_flops_per_token(config, SEQ)
    assert 3 * forward < selective < 4 * forward
    with pytest.raises(ValueError, match="recompute 'some'"):
        training_flops_per_token(config, SEQ, recompute="some")
    with pytest.raises(ValueError, match="seq_length"):
        forward_flops_per_token(config, 0)


@pytest.mark.parametrize("granularity", ["full", "selective"])
@pytest.mark.parametrize("name", ["llama_gqa_tied", "gpt_neox"])
def test_recompute_flops_are_what_the_backward_reruns(name, granularity):
    """With GPTModel.set_recompute the backward pass reruns the checkpointed forwards, and FlopCounterMode counts
    them. training_flops_per_token(recompute=...) counts the whole checkpointed region again; the
    non-reentrant checkpoint stops as soon as every tensor the backward needs is back, so it skips the
    region's last matmul: each layer's fc2 (full), or A V on the math attention path (selective; the fused
    kernel is one op and reruns whole)."""
    config, model, tokens = make(name)
    model.train().set_recompute(granularity)
    n = BATCH * SEQ
    expected = training_flops_per_token(config, SEQ, recompute=granularity) * n
    if granularity == "full":
        skipped = sum(2 * config.hidden_size * config.layer_ffn(i) for i in range(config.num_layers)) * n
    else:
        skipped = attention_core_flops_per_token(config, SEQ) * n / 2
    assert counted(model, tokens, backward=True) == pytest.approx(expected - skipped, rel=1e-9)
    assert expected - skipped > training_flops_per_token(config, SEQ) * n
