"""Sub-networks: masked parent == extracted student, exact parameter counts, selection and validation."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from megatron_subnet.model.config import ConfigError, ModelConfig
from megatron_subnet.model.extract import extract_state_dict
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices
from tests.tiny_models import tiny

VOCAB = 61

PARENTS = {
    # llama: RMSNorm, SwiGLU, grouped-query attention (4 heads per group), tied embeddings, head_dim != hidden/heads
    "llama_gqa_tied": tiny(
        "llama", vocab_size=VOCAB, hidden_size=24, num_layers=4, num_attention_heads=8, num_query_groups=2,
        head_dim=6, ffn_hidden_size=40, tie_word_embeddings=True, init_std=0.3,
    ),
    # Pythia: LayerNorm with bias, GELU, every bias, parallel residual, partial rotary
    "gpt_neox": tiny(
        "gpt_neox", vocab_size=VOCAB, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=4,
        head_dim=8, ffn_hidden_size=48, init_std=0.3,
    ),
    # a parent whose layers already differ (itself a per-layer student), untied, Qwen2-style q/k/v bias
    "llama_per_layer": tiny(
        "llama", vocab_size=VOCAB, hidden_size=20, num_layers=3, num_attention_heads=[6, 4, 3],
        num_query_groups=[3, 1, 3], head_dim=4, ffn_hidden_size=[16, 24, 8], qkv_bias=True, mlp_bias=True,
        init_std=0.3,
    ),
}


def make_parent(name: str, seed: int = 0) -> GPTModel:
    """A parent with large random weights and non-trivial norms and biases (so every index matters)."""
    torch.manual_seed(seed)
    model = GPTModel(ModelConfig(**PARENTS[name])).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layernorm" in pname or pname.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    return model


def random_subnet(parent: ModelConfig, rng: random.Random) -> SubnetConfig:
    """A random valid sub-network: any layers, channels, groups, equal heads per kept group, neurons."""

    def subset(n: int, k: int | None = None) -> list[int]:
        return sorted(rng.sample(range(n), rng.randint(1, n) if k is None else k))

    layers = subset(parent.num_layers)
    heads, groups, mlp = [], [], []
    for layer in layers:
        p_heads, p_groups = parent.layer_heads(layer), parent.layer_query_groups(layer)
        per_group = p_heads // p_groups
        kept_groups = subset(p_groups)
        keep = rng.randint(1, per_group)
        kept_heads = [g * per_group + h for g in kept_groups for h in subset(per_group, keep)]
        groups.append(kept_groups)
        heads.append(kept_heads)
        mlp.append(subset(parent.layer_ffn(layer)))
    return SubnetConfig(layers, subset(parent.hidden_size), heads, groups, mlp)


def student_from(parent: GPTModel, subnet: SubnetConfig) -> GPTModel:
    config, state = extract_state_dict(parent.config, parent.state_dict(), subnet)
    student = GPTModel(config).eval()
    student.load_state_dict(state, strict=True)
    return student


def tokens(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(PARENTS))
def test_masked_equals_extracted_for_random_subnets(name):
    parent = make_parent(name)
    rng = random.Random(list(PARENTS).index(name))
    x = tokens()
    widths_differ = 0
    for trial in range(30):
        subnet = random_subnet(parent.config, rng)
        student_config, state = extract_state_dict(parent.config, parent.state_dict(), subnet)
        widths_differ += not student_config.is_uniform
        student = GPTModel(student_config).eval()
        student.load_state_dict(state, strict=True)
        with torch.no_grad():
            masked, extracted = parent(x, subnet=subnet), student(x)
        assert masked.shape == extracted.shape == (*x.shape, VOCAB)
        diff = (masked - extracted).abs().max().item()
        assert diff <= 1e-5, f"trial {trial}: masked and extracted differ by {diff} for {subnet}"
        numel = sum(t.numel() for t in state.values())
        assert subnet.num_parameters(parent.config) == numel == student_config.num_parameters(), subnet
        assert sum(p.numel() for p in student.parameters()) == numel
        assert subnet.num_parameters(parent.config, include_embeddings=False) == student_config.num_parameters(False)
    assert widths_differ >= 10, "the random sub-networks should mostly have per-layer widths"


@pytest.mark.parametrize("name", list(PARENTS))
def test_masked_equals_extracted_in_bf16(name):
    """In bf16 the masked parent and the extracted student run the same bf16 matmuls on the same bf16 weights:
    their logits agree within bf16 rounding (2^-7 of the logits' scale), 10 random sub-networks each, and both
    stay within bf16 tolerance of the fp32 masked run."""
    parent = make_parent(name)
    rng = random.Random(100 + list(PARENTS).index(name))
    x = tokens()
    parent_bf16 = make_parent(name).to(torch.bfloat16)
    for trial in range(10):
        subnet = random_subnet(parent.config, rng)
        student = student_from(parent_bf16, subnet).to(torch.bfloat16)  # its weights: bf16 values copied
        assert all(p.dtype == torch.bfloat16 for p in student.parameters())
        with torch.no_grad():
            masked, extracted = parent_bf16(x, subnet=subnet), student(x)
            reference = parent(x, subnet=subnet)
        assert masked.dtype == extracted.dtype == torch.bfloat16
        scale = reference.abs().max().item()
        diff = (masked.float() - extracted.float()).abs().max().item()
        assert diff <= scale * 2**-7, f"trial {trial}: bf16 masked and extracted differ by {diff} (scale {scale})"
        drift = (masked.float() - reference).abs().max().item()
        assert drift <= scale * 0.1, f"trial {trial}: bf16 is {drift} from fp32 (scale {scale})"


@pytest.mark.parametrize("name", list(PARENTS))
def test_full_subnet_is_the_dense_model(name):
    parent = make_parent(name)
    full = SubnetConfig.full(parent.config)
    index = subnet_indices(parent.config, full)
    assert index.hidden is None
    assert all(li.qkv_rows is None and li.proj_cols is None and li.mlp_rows is None for li in index.per_layer)
    x = tokens(1)
    with torch.no_grad():
        assert torch.equal(parent(x, subnet=full), parent(x))
        assert torch.equal(student_from(parent, full)(x), parent(x))
    assert full.num_parameters(parent.config) == parent.config.num_parameters()
    assert parent.config.num_parameters() == sum(p.numel() for p in parent.parameters())


def test_tied_embeddings_stay_tied_and_untied_output_is_sliced():
    tied = make_parent("llama_gqa_tied")
    subnet = SubnetConfig.from_counts(tied.config, num_layers=2, hidden_size=10)
    config, state = extract_state_dict(tied.config, tied.state_dict(), subnet)
    assert config.tie_word_embeddings and "output_layer.weight" not in state
    assert torch.equal(state["embedding.weight"], tied.embedding.weight[:, :10])
    untied = make_parent("llama_per_layer")
    config, state = extract_state_dict(
        untied.config, untied.state_dict(), SubnetConfig.from_counts(untied.config, hidden_size=7)
    )
    assert torch.equal(state["output_layer.weight"], untied.output_layer.weight[:, :7])


def test_layer_order_and_extracted_layer_weights():
    """Kept layers keep their order; student layer j holds parent layer ``layers[j]``'s selected weights."""
    parent = make_parent("gpt_neox")
    subnet = SubnetConfig([1, 3], list(range(0, 32, 2)), [[0, 2], [1]], [[0, 2], [1]], [list(range(10)), [5, 7]])
    config, state = extract_state_dict(parent.config, parent.state_dict(), subnet)
    assert config.num_layers == 2 and config.num_attention_heads == [2, 1] and config.ffn_hidden_size == [10, 2]
    hidden = torch.arange(0, 32, 2)
    fc2 = parent.layers[3].mlp.linear_fc2.weight
    assert torch.equal(state["layers.1.mlp.linear_fc2.weight"], fc2[hidden][:, [5, 7]])
    assert torch.equal(state["layers.1.mlp.linear_fc1.bias"], parent.layers[3].mlp.linear_fc1.bias[[5, 7]])
    # gpt_neox QKV rows per head: [q, k, v] blocks of head_dim; head 1 of layer 3
    qkv = parent.layers[3].self_attention.linear_qkv.weight
    assert torch.equal(state["layers.1.self_attention.linear_qkv.weight"], qkv[24:48][:, hidden])


# --- selection by counts and by importance ---------------------------------------------------------------


def test_from_counts_keeps_the_first_units():
    parent = ModelConfig(**PARENTS["llama_gqa_tied"])
    s = SubnetConfig.from_counts(
        parent, num_layers=3, hidden_size=10, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=[5, 6, 7]
    )
    assert s.layers == [0, 1, 2] and s.hidden == list(range(10))
    assert s.query_groups == [[0, 1]] * 3
    assert s.heads == [[0, 1, 4, 5]] * 3  # 2 of the 4 heads in each of the 2 groups
    assert s.mlp == [list(range(5)), list(range(6)), list(range(7))]
    s = SubnetConfig.from_counts(parent, num_attention_heads=[8, 3], num_query_groups=[2, 1], num_layers=2)
    assert s.heads == [list(range(8)), [0, 1, 2]] and s.query_groups == [[0, 1], [0]]
    # heads default to the parent's heads per group times the kept groups
    assert SubnetConfig.from_counts(parent, num_query_groups=1).heads[0] == [0, 1, 2, 3]


def fake_importance(parent: ModelConfig, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    n = parent.num_layers
    return SimpleNamespace(
        layers=torch.rand(n, generator=g),
        hidden=torch.rand(parent.hidden_size, generator=g),
        heads=[torch.rand(parent.layer_heads(i), generator=g) for i in range(n)],
        query_groups=[torch.rand(parent.layer_query_groups(i), generator=g) for i in range(n)],
        mlp=[torch.rand(parent.layer_ffn(i), generator=g) for i in range(n)],
    )


def top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


def test_from_counts_by_importance_keeps_the_most_important_units():
    parent = ModelConfig(**PARENTS["llama_gqa_tied"])
    imp = fake_importance(parent)
    s = SubnetConfig.from_counts(
        parent,
        num_layers=2,
        hidden_size=9,
        num_attention_heads=2,
        num_query_groups=1,
        ffn_hidden_size=11,
        importance=imp,
    )
    assert s.layers == top(imp.layers, 2)
    assert s.hidden == top(imp.hidden, 9)
    for j, layer in enumerate(s.layers):  # per-layer scores are indexed by the *parent* layer
        (g,) = top(imp.query_groups[layer], 1)
        assert s.query_groups[j] == [g]
        assert s.heads[j] == [4 * g + h for h in top(imp.heads[layer][4 * g : 4 * g + 4], 2)]
        assert s.mlp[j] == top(imp.mlp[layer], 11)
    s.validate(parent)


def test_importance_ties_go_to_the_lower_index():
    parent = ModelConfig(**PARENTS["gpt_neox"])
    imp = fake_importance(parent)
    imp.hidden = torch.zeros(parent.hidden_size)
    imp.hidden[[30, 5]] = 1.0
    s = SubnetConfig.from_counts(parent, hidden_size=4, importance=imp)
    assert s.hidden == [0, 1, 5, 30]


def test_from_dict_counts_and_order():
    parent = ModelConfig(**PARENTS["llama_gqa_tied"])
    imp = fake_importance(parent, seed=3)
    counts = {
        "num_layers": 2,
        "hidden_size": 12,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 20,
    }
    assert SubnetConfig.from_dict(counts, parent) == SubnetConfig.from_counts(parent, **counts)
    assert SubnetConfig.from_dict({**counts, "order": "first"}, parent, imp) == SubnetConfig.from_counts(
        parent, **counts
    )
    by_importance = SubnetConfig.from_dict({**counts, "order": "importance"}, parent, imp)
    assert by_importance == SubnetConfig.from_counts(parent, **counts, importance=imp)
    assert by_importance.layers == top(imp.layers, 2)
    with pytest.raises(ConfigError, match="needs importance scores"):
        SubnetConfig.from_dict({**counts, "order": "importance"}, parent)
    with pytest.raises(ConfigError, match="order 'best'"):
        SubnetConfig.from_dict({**counts, "order": "best"}, parent)
    with pytest.raises(ConfigError, match="unknown keys"):
        SubnetConfig.from_dict({"num_layer": 2}, parent)
    with pytest.raises(ConfigError, match="unexpected keys"):
        SubnetConfig.from_dict({**SubnetConfig.full(parent).to_dict(), "num_layers": 2}, parent)
    explicit = SubnetConfig.from_counts(parent, num_layers=3, hidden_size=5).to_dict()
    assert SubnetConfig.from_dict(explicit, parent) == SubnetConfig(**explicit)
    with pytest.raises(ConfigError, match=r"missing keys \['mlp'\]"):
        SubnetConfig.from_dict({k: v for k, v in explicit.items() if k != "mlp"}, parent)


@pytest.mark.parametrize(
    "counts, message",
    [
        (dict(num_layers=0), "num_layers 0: must be in 1..4"),
        (dict(num_layers=5), "num_layers 5: must be in 1..4"),
        (dict(hidden_size=25), "hidden_size 25: must be in 1..24"),
        (dict(num_attention_heads=3, num_query_groups=2), "3 heads in 2 query groups do not fit"),
        (dict(num_attention_heads=10, num_query_groups=2), "10 heads in 2 query groups do not fit"),
        (dict(num_query_groups=3), "query groups do not fit"),
        (dict(ffn_hidden_size=41), "ffn_hidden_size 41 must be in 1..40"),
        (dict(num_layers=2, ffn_hidden_size=[4]), "ffn_hidden_size: 1 per-layer values, need one per kept layer"),
    ],
)
def test_from_counts_errors(counts, message):
    parent = ModelConfig(**PARENTS["llama_gqa_tied"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        SubnetConfig.from_counts(parent, **counts)


def valid_explicit() -> dict:
    return dict(
        layers=[0, 2], hidden=[0, 3, 5, 7], heads=[[0, 1, 4, 5], [4]], query_groups=[[0, 1], [1]], mlp=[[0, 1], [3, 39]]
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(layers=[0, 4]), "layers: index 4 out of range for 4 parent layers"),
        (dict(layers=[-1, 2]), "layers: index -1 out of range"),
        (dict(layers=[]), "layers: empty"),
        (dict(layers=[2, 2]), "layers: duplicate index 2"),
        (dict(layers=[2, 0]), r"layers: indices must be ascending \(2 before 0\)"),
        (dict(layers=[0, "2"]), "layers: expected a list of integers"),
        (dict(hidden=[0, 24]), "hidden: index 24 out of range for 24 hidden channels"),
        (dict(hidden=[]), "hidden: empty"),
        (dict(mlp=[[0, 1], [40]]), r"mlp\[1\]: index 40 out of range for 40 MLP neurons in layer 2"),
        (dict(mlp=[[0, 1], []]), r"mlp\[1\]: empty"),
        (dict(mlp=[[0, 1]]), "mlp: 1 entries for 2 kept layers"),
        (dict(heads=[[0, 1, 4, 5], [8]]), r"heads\[1\]: index 8 out of range for 8 heads in layer 2"),
        (dict(heads=[[0, 1, 4, 5], [0]]), r"heads\[1\]: head 0 belongs to query group 0, which is not kept"),
        (dict(heads=[[0, 1, 4], [4]]), r"heads\[0\]: kept query groups keep \[1, 2\] heads"),
        (dict(heads=[[0, 1], [4]]), r"heads\[0\]: kept query groups keep \[0, 2\] heads"),
        (dict(query_groups=[[0, 2], [1]]), r"query_groups\[0\]: index 2 out of range for 2 query groups"),
        (dict(query_groups=[[0, 0], [1]]), r"query_groups\[0\]: duplicate index 0"),
    ],
)
def test_validation_errors_name_the_problem(change, message):
    parent = ModelConfig(**PARENTS["llama_gqa_tied"])
    SubnetConfig(**valid_explicit()).validate(parent)
    subnet = SubnetConfig(**{**valid_explicit(), **change})
    with pytest.raises(ConfigError, match=message):
        subnet.validate(parent)
    with pytest.raises(ConfigError, match=message):
        extract_state_dict(parent, GPTModel(parent).state_dict(), subnet)


def test_json_round_trip(tmp_path):
    parent = make_parent("llama_per_layer")
    subnet = random_subnet(parent.config, random.Random(7))
    path = tmp_path / "subnet.json"
    subnet.save(path)
    assert json.loads(path.read_text()) == subnet.to_dict()
    loaded = SubnetConfig.load(path, parent.config)
    assert loaded == subnet
    x = tokens(2)
    with torch.no_grad():
        assert torch.equal(parent(x, subnet=loaded), parent(x, subnet=subnet))
    # counts round-trip through a JSON file too
    path.write_text(json.dumps({"num_layers": 2, "hidden_size": 8}))
    assert SubnetConfig.load(path, parent.config) == SubnetConfig.from_counts(parent.config, 2, 8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "expected a JSON object"),
        ('{"layers": [0], "hidden": [0], "heads": 3, "query_groups": [[0]], "mlp": [[0]]}', "invalid sub-network"),
        ('{"num_layers": 9}', "num_layers 9: must be in 1..3"),
    ],
)
def test_load_errors_name_the_file(tmp_path, text, message):
    parent = ModelConfig(**PARENTS["llama_per_layer"])
    path = tmp_path / "bad_subnet.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        SubnetConfig.load(path, parent)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="No such file"):
        SubnetConfig.load(tmp_path / "missing.json", parent)


# ---------------------------------------------------------------------- strict JSON (issue 8)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"num_layers": "2"}, "num_layers: expected an integer, got '2'"),
        ({"num_layers": True}, "num_layers: expected an integer, got True"),
        ({"hidden_size": 8.0}, "hidden_size: expected an integer, got 8.0"),
        ({"num_layers": 2, "ffn_hidden_size": [4, 2.7]}, r"ffn_hidden_size\[1\]: expected an integer, got 2.7"),
        ({"num_layers": 2, "ffn_hidden_size": ["3", 4]}, r"ffn_hidden_size\[0\]: expected an integer, got '3'"),
        ({"num_layers": 2, "num_query_groups": [1, True]}, r"num_query_groups\[1\]: expected an integer, got True"),
        ({"num_layers": 2, "ffn_hidden_size": [4, 4, 4]}, r"ffn_hidden_size: 3 per-layer values, need one per kept"),
        ({"num_attention_heads": "8"}, "num_attention_heads: expected an integer or a list of integers"),
        ({"num_layers": 1, "order": ["first"]}, r"order \['first'\]: expected 'first' or 'importance'"),
        ({"num_layers": 1, "order": True}, "order True: expected 'first' or 'importance'"),
        ({**dict(layers=[True, 2]), **{k: v for k, v in valid_explicit().items() if k != "layers"}},
         "layers: expected a list of integers"),
        ({**valid_explicit(), "hidden": [0, 3.0, 5, 7]}, "hidden: expected a list of integers"),
        ({**valid_explicit(), "mlp": [[0, 1], [3, 39.0]]}, r"mlp\[1\]: expected a list of integers"),
        ({**valid_explicit(), "heads": 4}, "heads: expected a list of index lists"),
        ({**valid_explicit(), "query_groups": [[0, 1], [1], [0]]}, "query_groups: 3 entries for 2 kept layers"),
    ],
)
def test_subnet_json_rejects_what_is_not_an_integer_or_does_not_fit(tmp_path, content, message):
    """Strings, booleans and floats (once accepted: ``True`` is an int to Python, ``int("3")`` works) and
    surplus per-layer entries (once silently dropped) are errors naming the file and the key."""
    parent = ModelConfig(**PARENTS["llama_gqa_tied"])
    path = tmp_path / "subnet.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message) as e:
        SubnetConfig.load(path, parent, fake_importance(parent))
    assert str(e.value).startswith(f"{path}: invalid sub-network (")


# ---------------------------------------------------------------------- model_config.json (issue 8)


def saved_config(tmp_path, config: ModelConfig | None = None, drop=(), **changes):
    d = (config or ModelConfig(**PARENTS["gpt_neox"])).to_dict()
    for name in drop:
        del d[name]
    d.update(changes)
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("name", PARENTS)
def test_model_config_round_trips_through_its_file(tmp_path, name):
    config = ModelConfig(**PARENTS[name])
    config.save(tmp_path / "model_config.json")
    assert ModelConfig.load(tmp_path / "model_config.json") == config


@pytest.mark.parametrize("missing", ["rope_theta", "norm_eps", "rotary_pct", "num_query_groups", "qkv_bias", "arch"])
def test_model_config_file_must_name_every_field_that_changes_the_numbers(tmp_path, missing):
    path = saved_config(tmp_path, drop=[missing])
    with pytest.raises(ConfigError, match=f"missing field {missing} ") as e:
        ModelConfig.load(path)
    assert str(e.value).startswith(f"{path}: ")


def test_model_config_file_may_leave_out_the_documented_defaults(tmp_path):
    full = ModelConfig(**{**PARENTS["gpt_neox"], "bos_token_id": 1, "eos_token_id": 2, "extra": {"a": 1}})
    loaded = ModelConfig.load(saved_config(tmp_path, full, drop=["extra", "bos_token_id", "eos_token_id", "init_std"]))
    assert (loaded.extra, loaded.bos_token_id, loaded.eos_token_id, loaded.init_std) == ({}, None, None, 0.02)
    import dataclasses

    same = dataclasses.replace(full, extra={}, bos_token_id=None, eos_token_id=None, init_std=0.02)
    assert loaded == same


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(norm_eps=-1e-05), "norm_eps: must be a positive finite number, got -1e-05"),
        (dict(norm_eps=0), "norm_eps: must be a positive finite number, got 0"),
        (dict(norm_eps=float("nan")), "norm_eps: must be a positive finite number, got nan"),
        (dict(rope_theta=float("inf")), "rope_theta: must be a positive finite number, got inf"),
        (dict(rope_theta="10000"), "rope_theta: must be a positive finite number, got '10000'"),
        (dict(init_std=0.0), "init_std: must be a positive finite number"),
        (dict(rotary_pct=0), r"rotary_pct: must be a number in \(0, 1\], got 0"),
        (dict(rotary_pct=1.5), r"rotary_pct: must be a number in \(0, 1\], got 1.5"),
        (dict(hidden_size=32.0), "hidden_size: must be an integer >= 1, got 32.0"),
        (dict(hidden_size=True), "hidden_size: must be an integer >= 1, got True"),
        (dict(num_layers="4"), "num_layers: must be an integer >= 1, got '4'"),
        (dict(vocab_size=0), "vocab_size: must be an integer >= 1, got 0"),
        (dict(max_position_embeddings=0), "max_position_embeddings: must be an integer >= 1, got 0"),
        (dict(num_attention_heads=[4, 4, 4, True]), r"num_attention_heads\[3\]: must be an integer >= 1, got True"),
        (dict(ffn_hidden_size=[48, 48]), "ffn_hidden_size: 2 per-layer values for 4 layers"),
        (dict(ffn_hidden_size=0), "ffn_hidden_size: must be an integer >= 1, got 0"),
        (dict(qkv_bias=1), "qkv_bias: must be true or false, got 1"),
        (dict(parallel_residual="yes"), "parallel_residual: must be true or false, got 'yes'"),
        (dict(bos_token_id="1"), "bos_token_id: must be an integer token id or null, got '1'"),
        (dict(arch="gpt2"), "arch: expected one of llama, gpt_neox, got 'gpt2'"),
        (dict(activation=None), "activation: expected one of .*, got None"),
        (dict(extra=[]), "extra: must be a JSON object, got"),
        (dict(num_query_groups=3), "layer 0: 4 attention heads do not split into 3 query groups"),
    ],
)
def test_model_config_file_errors_name_the_file_and_the_field(tmp_path, changes, message):
    path = saved_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.load(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message):  # the constructor checks the same
        ModelConfig(**{**PARENTS["gpt_neox"], **changes})


def test_model_config_file_that_is_not_an_object(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.load(path)


def test_check_seq_length_names_the_flag_and_both_numbers():
    config = ModelConfig(**{**PARENTS["gpt_neox"], "max_position_embeddings": 64})
    config.check_seq_length(64)
    with pytest.raises(ConfigError, match="^--seq-length 65: longer than the model's max_position_embeddings 64$"):
        config.check_seq_length(65)
    with pytest.raises(ConfigError, match="^--fitness-seq 99: "):
        config.check_seq_length(99, "--fitness-seq")


def test_saves_write_atomically_and_clear_a_killed_writes_temporaries(tmp_path):
    """ModelConfig, SubnetConfig and Importance files are written through ``outputs``: a temporary left by a
    killed writer (its process gone) beside the file is removed by the next save, and none is left."""
    import subprocess
    import sys

    from megatron_subnet import outputs
    from megatron_subnet.model.importance import Importance, load_importance

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = ModelConfig(**PARENTS["llama_gqa_tied"])
    imp = fake_importance(parent)
    importance = Importance(imp.hidden, imp.heads, imp.query_groups, imp.mlp, imp.layers)
    subnet = SubnetConfig.from_counts(parent, num_layers=2)
    saves = {
        "model_config.json": (lambda p: parent.save(p), lambda p: ModelConfig.load(p) == parent),
        "subnet.json": (lambda p: subnet.save(p), lambda p: SubnetConfig.load(p, parent) == subnet),
        "imp.safetensors": (importance.save, lambda p: torch.equal(load_importance(p).hidden, importance.hidden)),
    }
    for name, (save, check) in saves.items():
        path = tmp_path / name
        path.write_text("old")
        leftover = path.with_name(f".{name}.tmp-{outputs._HOST}-{dead.pid}-abc123")
        leftover.write_text("half-written")
        save(path)
        assert check(path) and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(saves)
