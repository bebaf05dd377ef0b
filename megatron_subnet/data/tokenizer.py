"""One tokenizer interface over Hugging Face tokenizers and sentencepiece models.

Type names follow Megatron-LM's ``--tokenizer-type``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "NullTokenizer")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built from the given type and model."""


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod(self) -> int:
        """The end-of-document token appended by ``--append-eod``."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]


class HuggingFaceTokenizer(Tokenizer):
    """A directory saved by transformers (``tokenizer.json`` ...), or a ``.gguf`` file."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        path = str(path)
        if not os.path.exists(path):
            raise TokenizerError(f"--tokenizer-model {path}: no such file or directory")
        if not (os.path.isdir(path) or path.endswith(".gguf")):
            raise TokenizerError(
                f"--tokenizer-model {path}: expected a directory saved by transformers or a .gguf file"
            )
        try:
            if path.endswith(".gguf"):
                directory, name = os.path.split(os.path.abspath(path))
                self._hf = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
            else:
                self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types for unreadable tokenizers
            reason = (str(e).strip().splitlines() or [""])[0]
            raise TokenizerError(
                f"--tokenizer-model {path}: not a Hugging Face tokenizer ({type(e).__name__}: {reason})"
            ) from None
        # The Rust backend encodes batches without Python overhead; it is what the bare baseline measures.
        self._backend = getattr(self._hf, "backend_tokenizer", None)
        eod = self._hf.eos_token_id
        if eod is None:
            raise TokenizerError(f"--tokenizer-model {path}: the tokenizer defines no eos token to use as EOD")
        self._eod = int(eod)

    def tokenize(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is None:
            return super().tokenize_batch(texts)
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def eod(self) -> int:
        return self._eod


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        path = str(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"--tokenizer-model {path}: no such file")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"--tokenizer-model {path}: not a sentencepiece model ({e})") from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"--tokenizer-model {path}: the model defines no eos piece to use as EOD")

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated token ids; EOD is ``vocab_size - 1`` (as in Megatron-LM)."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or vocab_size < 2:
            raise TokenizerError("--vocab-size: NullTokenizer needs a vocabulary size of at least 2")
        self._vocab_size = vocab_size

    def tokenize(self, text: str) -> list[int]:
        ids = [int(t) for t in text.split()]
        for i in ids:
            if not 0 <= i < self._vocab_size - 1:
                raise ValueError(f"token {i} outside [0, {self._vocab_size - 1})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """Build a tokenizer by Megatron type name; raises TokenizerError with a one-line reason."""
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise TokenizerError("--tokenizer-model is required for HuggingFaceTokenizer")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise TokenizerError("--tokenizer-model is required for SentencePieceTokenizer")
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerError(f"--tokenizer-type {tokenizer_type}: unknown (choose from {', '.join(TOKENIZER_TYPES)})")
