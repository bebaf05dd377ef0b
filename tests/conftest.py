"""Shared fixtures: tiny tokenizers trained here (no downloads), JSONL writers, a tiny parent of each architecture."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.tiny_models import SHAPES, tiny_shape

WORDS = (
    "the model data layer token train search parent student teacher head group neuron channel loss "
    "gradient pipeline tensor parallel shard index sample document epoch batch weight norm attention "
    "a of and to in is it for on with as by at from"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def write_jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or raw strings written verbatim as lines) to a JSONL file."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    rng = random.Random(0)
    return [random_text(rng, rng.randint(1, 60)) for _ in range(400)]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, corpus_texts) -> Path:
    """A byte-level BPE tokenizer trained on the synthetic corpus, saved as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(corpus_texts, trainer)
    out = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_texts) -> Path:
    """A sentencepiece model trained by tools/train_tokenizer.py on the synthetic corpus."""
    from tools.train_tokenizer import main

    tmp = tmp_path_factory.mktemp("spm")
    corpus = write_jsonl(tmp / "corpus.jsonl", [{"text": t} for t in corpus_texts])
    assert main(["--input", str(corpus), "--model-prefix", str(tmp / "spm"), "--vocab-size", "320"]) == 0
    return tmp / "spm.model"


@pytest.fixture(params=sorted(SHAPES), ids=sorted(SHAPES))
def tiny_config(request) -> dict:
    """The ``ModelConfig`` keyword arguments of a tiny parent of each architecture in turn (``tiny_models.py``)."""
    return tiny_shape(request.param)
