"""The real teacher, SmolLM2-135M-Instruct: GGUF import, logit parity with transformers, a ~50% sub-network.

Needs the files ``tools/fetch_teacher.py`` puts in the cache dir (CI fetches them first); without them
these tests fail, they do not skip. The GGUF -> checkpoint conversion (~20 s) is cached in
``cache_dir()/test_teacher_ckpt`` and redone when the GGUF is newer.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_subnet.cache import cache_dir
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.extract import extract_state_dict
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.hf import load_hf, save_hf
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import CheckpointError, load_checkpoint

pytestmark = pytest.mark.slow  # the real 135M teacher, end to end (make test-fast leaves it out)

HF_DIR = "smollm2-135m-instruct"
GGUF = "gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
CKPT = "test_teacher_ckpt"
TEXTS = (
    "The capital of France is Paris. It is known for the Eiffel Tower, museums such as the Louvre, and a "
    "long history of art, science and food that draws millions of visitors every year.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])",
)
SEQ = 32


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"teacher file {path} is missing: run `python tools/fetch_teacher.py` first (it fetches "
            f"SmolLM2-135M-Instruct into {cache_dir()})",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def teacher_hf_dir() -> Path:
    root = require(cache_dir() / HF_DIR)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        require(root / name)
    return root


@pytest.fixture(scope="session")
def teacher(teacher_hf_dir) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """Config, weights and directory of our checkpoint of the teacher, converted from the GGUF through load_hf."""
    from tools.convert_checkpoint import main as convert

    gguf = require(cache_dir() / GGUF)
    ckpt = cache_dir() / CKPT
    weights = ckpt / "model.safetensors"
    if weights.is_file() and weights.stat().st_mtime >= gguf.stat().st_mtime:
        try:
            config, state = load_checkpoint(ckpt)
            return config, state, ckpt
        except CheckpointError:
            pass  # rebuild below
    # load_hf(gguf) + the GGUF's tokenizer + save_checkpoint (atomic: a reader never sees half of it)
    assert convert(["import", "--input", str(gguf), "--output", str(ckpt), "--overwrite"]) == 0
    config, state = load_checkpoint(ckpt)
    return config, state, ckpt


@pytest.fixture(scope="module")
def tokens(teacher_hf_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_hf_dir, local_files_only=True)
    ids = [tok(t)["input_ids"][:SEQ] for t in TEXTS]
    assert all(len(i) == SEQ for i in ids)
    return torch.tensor(ids)


@pytest.fixture(scope="module")
def teacher_model(teacher) -> GPTModel:
    config, state, _ = teacher
    with torch.device("meta"):
        model = GPTModel(config)
    model.load_state_dict(state, assign=True)
    return model.eval()


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= tol, f"max abs logit difference {diff}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_teacher_is_smollm2_135m(teacher, teacher_hf_dir):
    config, state, ckpt = teacher
    assert (
        config.arch,
        config.num_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_query_groups,
        config.head_dim,
        config.ffn_hidden_size,
        config.vocab_size,
        config.tie_word_embeddings,
    ) == ("llama", 30, 576, 9, 3, 64, 1536, 49152, True)
    assert config.num_parameters() == sum(t.numel() for t in state.values()) == 134_515_008
    assert all(t.dtype == torch.float32 for t in state.values())
    assert (ckpt / "tokenizer.json").is_file()  # the GGUF's tokenizer came along
    # the GGUF read by us equals what transformers saved from the same GGUF
    _, from_hf_dir = load_hf(teacher_hf_dir)
    assert sorted(from_hf_dir) == sorted(state)
    assert all(torch.equal(from_hf_dir[k], state[k]) for k in state)


def test_logits_match_transformers(teacher_model, teacher_hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(teacher_hf_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        ours, theirs = teacher_model(tokens), hf(tokens).logits
    assert_logits_match(ours, theirs)
    # the instruct model predicts its own text well: a sanity check that the weights are the real ones
    accuracy = (ours[:, :-1].argmax(-1) == tokens[:, 1:]).float().mean().item()
    assert accuracy > 0.3, f"next-token accuracy {accuracy:.2f} on plain English and Python"


def test_half_subnetwork_masked_equals_extracted_and_exports(teacher, teacher_model, tokens, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, state, ckpt = teacher
    g = torch.Generator().manual_seed(0)
    n = config.num_layers
    scores = SimpleNamespace(  # scattered choices, so every index path is exercised on the real weights
        layers=torch.rand(n, generator=g),
        hidden=torch.rand(config.hidden_size, generator=g),
        heads=[torch.rand(config.layer_heads(i), generator=g) for i in range(n)],
        query_groups=[torch.rand(config.layer_query_groups(i), generator=g) for i in range(n)],
        mlp=[torch.rand(config.layer_ffn(i), generator=g) for i in range(n)],
    )
    subnet = SubnetConfig.from_counts(
        config,
        num_layers=22,
        hidden_size=480,
        num_attention_heads=6,
        num_query_groups=3,
        ffn_hidden_size=1024,
        importance=scores,
    )
    share = subnet.num_parameters(config) / config.num_parameters()
    assert 0.4 < share < 0.6, share
    student_config, student_state = extract_state_dict(config, state, subnet)
    assert sum(t.numel() for t in student_state.values()) == subnet.num_parameters(config)
    student = GPTModel(student_config).eval()
    student.load_state_dict(student_state, strict=True)
    with torch.no_grad():
        masked, extracted = teacher_model(tokens, subnet=subnet), student(tokens)
    diff = (masked - extracted).abs().max().item()
    assert diff <= 1e-5, f"masked and extracted differ by {diff}"

    save_hf(tmp_path / "student", student_config, student_state, tokenizer_from=ckpt)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "student", local_files_only=True).eval()
    assert sum(p.numel() for p in hf.parameters()) == subnet.num_parameters(config)
    with torch.no_grad():
        assert_logits_match(masked, hf(tokens).logits)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "student", local_files_only=True)(TEXTS[0])["input_ids"][:SEQ]
        == tokens[0].tolist()
    )


def _tp_logits(rank: int, ckpt: str, tokens: torch.Tensor) -> torch.Tensor | None:
    from megatron_subnet.model.weights import load_model
    from megatron_subnet.parallel.mappings import gather_from_tensor_model_parallel_region

    model = load_model(ckpt)  # this rank's third of every split tensor, read from its own shard file
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens))
    return logits if rank == 0 else None


def test_imported_at_tp3_gives_the_single_process_logits(teacher_hf_dir, teacher_model, tokens, tmp_path):
    """SmolLM2's 9 heads / 3 query groups, MLP 1536 and vocabulary 49152 split three ways: imported straight into
    3 shards, run on 3 ranks, the gathered logits equal one process's."""
    from tests.distributed import run_distributed
    from tools.convert_checkpoint import main as convert

    ckpt = tmp_path / "tp3"
    argv = ["import", "--input", str(teacher_hf_dir), "--output", str(ckpt), "--tensor-model-parallel-size", "3"]
    assert convert(argv) == 0
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == [f"mp_rank_{r:02d}.safetensors" for r in range(3)]
    batch = tokens[:1, :16]
    with torch.no_grad():
        expected = teacher_model(batch)
    got = run_distributed(_tp_logits, 3, tensor_parallel=3, args=(str(ckpt), batch))[0]
    assert got.shape == expected.shape == (1, 16, 49152)
    # fp32 rounding, not TP: against an fp64 run of the same weights one process is off by up to 5.5e-5 and TP=3 by
    # 4.2e-5 (logits up to ~30; the row-parallel partial sums add up in another order over 30 layers), so the two
    # differ by up to ~6e-5 in single elements, and by about 1e-6 relative to the logits as a whole.
    diff = (got - expected).abs().max().item()
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative <= 1e-5 and diff <= 1e-4, f"TP=3 logits differ by {diff} (max), {relative} (relative norm)"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
