"""Hugging Face <-> internal: configs and explicit per-architecture weight maps; GGUF through transformers.

Supported (``FAMILIES``, one entry per architecture family): ``llama`` (read from HF ``llama``, ``mistral``
and ``qwen2``: q/k/v bias) and ``gpt_neox`` (Pythia).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_subnet.model.config import ConfigError, ModelConfig
from megatron_subnet.model.qkv import QKVLayout
from megatron_subnet.model.shapes import expected_shapes
from megatron_subnet.model.weights import CheckpointError, check_state_dict, copy_tokenizer_files

_ACT_FROM_HF = {
    "silu": "swiglu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
# Buffers that old checkpoints store but that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


def _rope(hf) -> tuple[float, float]:
    """(theta, partial rotary factor) from a v5 ``rope_parameters`` dict or the older attributes."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{hf.model_type}: RoPE type {rope_type!r} / scaling is not supported (default RoPE only)")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", getattr(hf, "rotary_emb_base", 10000.0)))
    pct = params.get("partial_rotary_factor", getattr(hf, "rotary_pct", getattr(hf, "partial_rotary_factor", 1.0)))
    return float(theta), float(pct if pct is not None else 1.0)


def config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig for a transformers config (``PretrainedConfig``)."""
    model_type = hf.model_type
    fam = next((f for f in FAMILIES.values() if model_type in f.architectures), None)
    if fam is None:
        supported = ", ".join(t for f in FAMILIES.values() for t in f.architectures)
        raise ConfigError(f"model_type {model_type!r} is not supported ({supported})")
    theta, pct = _rope(hf)
    common = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        rope_theta=theta,
        rotary_pct=pct,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        init_std=getattr(hf, "initializer_range", 0.02),
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id if isinstance(hf.eos_token_id, int) else None,
        extra={"hf_model_type": model_type},
    )
    return fam.from_hf(hf, common)


def _llama_from_hf(hf, common: dict) -> ModelConfig:
    model_type = hf.model_type
    if _ACT_FROM_HF.get(hf.hidden_act) != "swiglu":
        raise ConfigError(f"{model_type}: hidden_act {hf.hidden_act!r} is not supported (silu expected)")
    if getattr(hf, "use_sliding_window", False):
        raise ConfigError(f"{model_type}: sliding-window attention is not supported")
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        arch="llama",
        num_query_groups=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        activation="swiglu",
        normalization="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        qkv_bias=True if model_type == "qwen2" else bias,
        proj_bias=False if model_type == "qwen2" else bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        parallel_residual=False,
        **common,
    )


def _gpt_neox_from_hf(hf, common: dict) -> ModelConfig:
    act = _ACT_FROM_HF.get(hf.hidden_act)
    if act is None:
        raise ConfigError(f"gpt_neox: hidden_act {hf.hidden_act!r} is not supported")
    bias = bool(getattr(hf, "attention_bias", True))
    return ModelConfig(
        arch="gpt_neox",
        num_query_groups=hf.num_attention_heads,
        head_dim=hf.hidden_size // hf.num_attention_heads,
        activation=act,
        normalization="layernorm",
        norm_eps=hf.layer_norm_eps,
        qkv_bias=bias,
        proj_bias=bias,
        mlp_bias=True,
        parallel_residual=bool(hf.use_parallel_residual),
        **common,
    )


def _hf_config(cls, **kwargs):
    """``cls(**kwargs)``; ConfigError when transformers' own validation rejects the values."""
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's strict dataclasses raise non-ValueError types
        cause = getattr(e, "__cause__", None) or e
        raise ConfigError(f"transformers rejects the {cls.__name__}: {(str(cause).splitlines() or [''])[0]}") from None


def config_to_hf(config: ModelConfig):
    """A transformers config for our ModelConfig; ConfigError when HF cannot express it."""
    if not config.is_uniform:
        raise ConfigError(
            "per-layer sizes (heads, query groups, MLP width) cannot be expressed in a Hugging Face "
            "config; export needs a sub-network with the same shape in every layer"
        )
    heads, ffn = config.layer_heads(0), config.layer_ffn(0)
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.init_std,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    return family(config).to_hf(config, common, rope)


def _llama_to_hf(config: ModelConfig, common: dict, rope: dict):
    from transformers import LlamaConfig, Qwen2Config

    heads, groups = config.layer_heads(0), config.layer_query_groups(0)
    if config.rotary_pct != 1.0:
        raise ConfigError("llama export: partial rotary is not expressible")
    kw = dict(num_key_value_heads=groups, head_dim=config.head_dim, rms_norm_eps=config.norm_eps, hidden_act="silu",
              rope_parameters=rope, **common)  # fmt: skip
    if config.hidden_size % heads:
        # transformers' LlamaConfig / Qwen2Config validation demands it even though head_dim is stored apart
        raise ConfigError(
            f"llama export: transformers requires hidden_size ({config.hidden_size}) to be a multiple of "
            f"num_attention_heads ({heads}); choose a sub-network whose hidden size is a multiple of its heads"
        )
    if config.qkv_bias and not config.proj_bias and not config.mlp_bias:
        return _hf_config(Qwen2Config, **kw)
    if config.qkv_bias != config.proj_bias:
        raise ConfigError("llama export: q/k/v and output-projection biases must agree (or be Qwen2's q/k/v only)")
    return _hf_config(LlamaConfig, attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, **kw)


def _gpt_neox_to_hf(config: ModelConfig, common: dict, rope: dict):
    from transformers import GPTNeoXConfig

    heads, groups = config.layer_heads(0), config.layer_query_groups(0)
    if groups != heads or config.hidden_size != heads * config.head_dim:
        raise ConfigError(
            f"gpt_neox export: HF GPT-NeoX needs hidden_size == heads * head_dim and no grouped-query attention "
            f"(got hidden {config.hidden_size}, {heads} heads of {config.head_dim}, {groups} groups)"
        )
    if not (config.qkv_bias == config.proj_bias and config.mlp_bias):
        raise ConfigError("gpt_neox export: attention biases must agree and the MLP must have biases")
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[config.activation]
    return _hf_config(
        GPTNeoXConfig, layer_norm_eps=config.norm_eps, hidden_act=act, use_parallel_residual=config.parallel_residual,
        attention_bias=config.qkv_bias, rope_parameters={**rope, "partial_rotary_factor": config.rotary_pct},
        **common,
    )  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One architecture family's facts: its HF tensor names (ours -> theirs, outside and inside layer ``i``)
    and whether its q/k/v are three HF tensors (fused into our one QKV by query group) or already fused."""

    top: dict[str, str]
    layer_prefix: str  # HF name prefix of layer {i}
    layer: dict[str, str]
    architectures: dict[str, str]  # HF model_type read as this family -> its transformers model class
    from_hf: Callable[..., ModelConfig]  # (HF config, common fields) -> ModelConfig
    to_hf: Callable[..., object]  # (ModelConfig, common HF fields, RoPE parameters) -> HF config
    split_qkv: str | None = None  # HF prefix of the q/k/v projections within a layer; None: fused as ours
    output_aliases: tuple[str, ...] = ()  # other names of the output layer's HF tensor


FAMILIES: dict[str, Family] = {
    "llama": Family(
        top={"embedding.weight": "model.embed_tokens.weight", "final_layernorm.weight": "model.norm.weight",
             "output_layer.weight": "lm_head.weight"},
        layer_prefix="model.layers.{i}.",
        layer={
            "input_layernorm.weight": "input_layernorm.weight",
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
            "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
            "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
            "mlp.linear_gate.weight": "mlp.gate_proj.weight",
            "mlp.linear_gate.bias": "mlp.gate_proj.bias",
            "mlp.linear_fc1.weight": "mlp.up_proj.weight",
            "mlp.linear_fc1.bias": "mlp.up_proj.bias",
            "mlp.linear_fc2.weight": "mlp.down_proj.weight",
            "mlp.linear_fc2.bias": "mlp.down_proj.bias",
        },
        architectures={"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"},
        from_hf=_llama_from_hf,
        to_hf=_llama_to_hf,
        split_qkv="self_attn.",
    ),
    "gpt_neox": Family(
        top={"embedding.weight": "gpt_neox.embed_in.weight",
             "final_layernorm.weight": "gpt_neox.final_layer_norm.weight",
             "final_layernorm.bias": "gpt_neox.final_layer_norm.bias", "output_layer.weight": "embed_out.weight"},
        layer_prefix="gpt_neox.layers.{i}.",
        layer={
            "input_layernorm.weight": "input_layernorm.weight",
            "input_layernorm.bias": "input_layernorm.bias",
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
            "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
            "self_attention.linear_qkv.weight": "attention.query_key_value.weight",
            "self_attention.linear_qkv.bias": "attention.query_key_value.bias",
            "self_attention.linear_proj.weight": "attention.dense.weight",
            "self_attention.linear_proj.bias": "attention.dense.bias",
            "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
            "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
            "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
            "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
        },
        architectures={"gpt_neox": "GPTNeoXForCausalLM"},
        from_hf=_gpt_neox_from_hf,
        to_hf=_gpt_neox_to_hf,
        output_aliases=("lm_head.weight",),  # transformers >= 5 names GPT-NeoX's embed_out so in memory
    ),
}  # fmt: skip


def family(config: ModelConfig) -> Family:
    """The table entry of ``config.arch``; ConfigError naming the supported families for any other."""
    if config.arch not in FAMILIES:
        raise ConfigError(f"arch {config.arch!r}: no Hugging Face mapping (supported: {', '.join(FAMILIES)})")
    return FAMILIES[config.arch]


def weight_map(config: ModelConfig) -> dict[str, str]:
    """Internal name -> HF name for every one-to-one tensor (split q/k/v are fused apart)."""
    fam = family(config)
    m = dict(fam.top)
    for i in range(config.num_layers):
        prefix = fam.layer_prefix.format(i=i)
        m.update({f"layers.{i}.{ours}": prefix + theirs for ours, theirs in fam.layer.items()})
    return m


def _qkv_layout(config: ModelConfig, i: int) -> QKVLayout:
    return QKVLayout(config.layer_heads(i), config.layer_query_groups(i), config.head_dim)


def state_from_hf(config: ModelConfig, hf_state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors; CheckpointError names missing and unexpected tensors."""
    fam = family(config)
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    output = fam.top["output_layer.weight"]
    for alias in fam.output_aliases:
        if alias in hf_state and output not in hf_state:
            hf_state[output] = hf_state.pop(alias)
    if config.tie_word_embeddings:
        for name in (output, *fam.output_aliases):
            hf_state.pop(name, None)
    expected = set(_expected(config))
    out, used = {}, set()
    for ours, theirs in weight_map(config).items():
        if ours in expected and theirs in hf_state:
            out[ours] = hf_state[theirs]
            used.add(theirs)
    if fam.split_qkv is not None:
        for i in range(config.num_layers):
            layout = _qkv_layout(config, i)
            p = fam.layer_prefix.format(i=i) + fam.split_qkv
            for kind in ("weight", "bias"):
                names = [f"{p}{x}_proj.{kind}" for x in "qkv"]
                if not all(n in hf_state for n in names):
                    continue
                out[f"layers.{i}.self_attention.linear_qkv.{kind}"] = layout.fuse(*(hf_state[n] for n in names))
                used.update(names)
    unused = sorted(set(hf_state) - used)
    missing = sorted(expected - set(out))
    if unused or missing:
        parts = (
            [f"missing HF tensors for {', '.join(missing[:4])}" + ("..." if len(missing) > 4 else "")]
            if missing
            else []
        ) + ([f"unexpected HF tensors {', '.join(unused[:4])}" + ("..." if len(unused) > 4 else "")] if unused else [])
        raise CheckpointError(f"{source}: weights do not fit the config: " + "; ".join(parts))
    check_state_dict(config, out, source)
    return out


def state_to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors from our state dict (inverse of ``state_from_hf``)."""
    fam = family(config)
    out = {theirs: state[ours] for ours, theirs in weight_map(config).items() if ours in state}
    if fam.split_qkv is not None:
        for i in range(config.num_layers):
            layout = _qkv_layout(config, i)
            for kind in ("weight", "bias"):
                name = f"layers.{i}.self_attention.linear_qkv.{kind}"
                if name not in state:
                    continue
                p = fam.layer_prefix.format(i=i) + fam.split_qkv
                for x, part in zip("qkv", layout.split(state[name])):
                    out[f"{p}{x}_proj.{kind}"] = part
    return {k: v.contiguous() for k, v in out.items()}


def _expected(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(config)


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (directory / "pytorch_model.bin").is_file():
        try:
            return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for corrupt pickles
            raise CheckpointError(f"{directory / 'pytorch_model.bin'}: unreadable ({str(e).splitlines()[0]})") from None
    else:
        raise CheckpointError(f"{directory}: no model.safetensors, safetensors index or pytorch_model.bin")
    state = {}
    for name in files:
        try:
            state.update(load_file(directory / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{directory / name}: corrupt or truncated safetensors ({str(e).splitlines()[0]})"
            ) from None
    return state


def _gguf_dequantize_kwargs() -> dict:
    """Ask for dense float weights: transformers with GGUF matmul kernels would otherwise keep them packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def save_gguf_tokenizer(path: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Write the tokenizer embedded in a ``.gguf`` file into ``directory`` (as transformers saves one).

    Returns the names of the files written; CheckpointError when the GGUF holds no readable tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        written = tok.save_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - gguf and transformers raise many types for bad files
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot read the GGUF tokenizer ({type(e).__name__}: {first})") from None
    return sorted({Path(f).name for f in written})


def load_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our config and state dict from a HF directory or a ``.gguf`` file (read by transformers)."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                dtype=torch.float32,
                local_files_only=True,
                **_gguf_dequantize_kwargs(),
            )
        except Exception as e:  # noqa: BLE001 - gguf and transformers raise many types for bad files
            raise CheckpointError(f"{path}: cannot read GGUF ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        config = config_from_hf(model.config)
        return config, state_from_hf(config, model.state_dict(), str(path))
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read config.json ({str(e).splitlines()[0]})") from None
    try:
        config = config_from_hf(hf_config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, state_from_hf(config, _read_hf_tensors(path), str(path))


def save_hf(
    directory: str | os.PathLike,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer_from: str | os.PathLike | None = None,
) -> None:
    """Write a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load as is."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from megatron_subnet.outputs import write_directory_atomically

    hf_config = config_to_hf(config)
    hf_config.architectures = [family(config).architectures[hf_config.model_type]]
    hf_config.dtype = "float32"
    tensors = state_to_hf(config, state)

    def fill(tmp: Path) -> None:
        hf_config.save_pretrained(tmp)
        GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
        save_file(
            {k: v.detach().cpu() for k, v in tensors.items()}, tmp / "model.safetensors", metadata={"format": "pt"}
        )
        copy_tokenizer_files(tokenizer_from, tmp)

    write_directory_atomically(directory, fill)
