"""Megatron-LM's memory-mapped indexed dataset (.bin/.idx), byte-compatible both ways.

``.idx`` layout (little-endian, no padding)::

    b"MMIDIDX\\x00\\x00"        9 bytes magic
    <Q version (1)
    <B dtype code              see DTYPE_CODES
    <Q sequence count N
    <Q document-index count D  (documents + 1)
    int32[N] sequence lengths  in tokens
    int64[N] sequence pointers byte offsets into .bin
    int64[D] document indices  sequence index where each document starts, then N

``.bin`` is the headerless concatenation of all token arrays.

Opening a pair checks it cheaply (vectorised over the .idx, no pass over the .bin): sizes, no negative
sequence length, every pointer equal to the byte offset the lengths before it give (a pointer into another
sequence or past the end of the .bin is refused), document indices ascending from 0 to N.
``IndexedDataset.token_range`` reads the whole .bin once to find the smallest and largest token id.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np

from megatron_subnet.outputs import remove_stale_temps, temp_sibling

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")
_CHUNK = 16 << 20  # elements per vectorised pass over large arrays (bounds the temporary memory)


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is missing, malformed or inconsistent."""

    same_on_every_rank = True  # a check of flags and shared files: under a launcher rank 0 reports it


def token_dtype(vocab_size: int | None) -> type[np.number]:
    """The token dtype Megatron picks: uint16 below 65500 tokens, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


def write_index(
    path: str | os.PathLike,
    dtype: type[np.number] | np.dtype,
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
) -> None:
    """Write an .idx file; pointers are derived from the lengths and the dtype."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    documents = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, _CODE_OF[dtype], len(lengths), len(documents)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))


class _Index:
    """Parsed .idx: arrays are zero-copy views into one memory map."""

    def __init__(self, path: str):
        try:
            buffer = np.memmap(path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise IndexedDatasetError(f"{path}: cannot read index ({e})") from None
        if len(buffer) < _HEADER.size:
            raise IndexedDatasetError(f"{path}: truncated index ({len(buffer)} bytes, header needs {_HEADER.size})")
        magic, version, code, count, doc_count = _HEADER.unpack(buffer[: _HEADER.size].tobytes())
        if magic != INDEX_MAGIC:
            raise IndexedDatasetError(f"{path}: not a Megatron MMap index (magic {magic!r})")
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{path}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code}")
        expected = _HEADER.size + count * (4 + 8) + doc_count * 8
        if len(buffer) != expected:
            raise IndexedDatasetError(
                f"{path}: index is {len(buffer)} bytes, header with {count} sequences "
                f"and {doc_count} document indices needs {expected}"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(buffer, np.int32, count, offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(buffer, np.int64, count, offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(buffer, np.int64, doc_count, offset)
        self._check_sequences(path)

    def _check_sequences(self, path: str) -> None:
        """No negative length; pointer ``i`` is the byte offset the lengths before ``i`` give (as every writer does)."""
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        negative = np.flatnonzero(lengths < 0)
        if len(negative):
            i = int(negative[0])
            raise IndexedDatasetError(
                f"{path}: sequence {i} has a negative length ({int(lengths[i])}); the index is corrupt"
            )
        itemsize = self.dtype.itemsize
        offset = 0  # byte offset where the current chunk's first sequence must start
        for start in range(0, len(lengths), _CHUNK):
            chunk = lengths[start : start + _CHUNK].astype(np.int64) * itemsize
            expected = np.cumsum(chunk) - chunk + offset
            wrong = np.flatnonzero(pointers[start : start + _CHUNK] != expected)
            if len(wrong):
                i = start + int(wrong[0])
                raise IndexedDatasetError(
                    f"{path}: sequence {i} points at byte {int(pointers[i])} of the .bin, but the lengths before it "
                    f"put it at byte {int(expected[wrong[0]])}; the index is corrupt"
                )
            offset += int(chunk.sum())


class IndexedDataset:
    """Read-only view of a .bin/.idx pair; ``ds[i]`` returns sequence ``i`` without copying."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: no such file")
        self._index = _Index(idx_path(prefix))
        bin_size = os.path.getsize(bin_path(prefix))
        total = int(self._index.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_size != total:
            raise IndexedDatasetError(f"{bin_path(prefix)}: {bin_size} bytes, but {idx_path(prefix)} describes {total}")
        docs = self._index.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(self) or np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(f"{idx_path(prefix)}: document indices are not 0..{len(self)} ascending")
        if bin_size == 0:
            self._bin = np.zeros(0, dtype=self.dtype)
        else:
            self._bin = np.memmap(bin_path(prefix), mode="r", dtype=self.dtype)

    @property
    def dtype(self) -> np.dtype:
        return self._index.dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self._index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self._index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self._index.document_indices

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self._index.sequence_lengths)

    def token_range(self) -> tuple[int, int] | None:
        """``(smallest, largest)`` token id in the whole .bin, or None when it holds no tokens.

        Reads the .bin once, 16M tokens at a time. Signed dtypes can hold negative ids: they show up as a
        negative smallest id (check it against ``[0, vocab_size)``).
        """
        if len(self._bin) == 0:
            return None
        low = high = None
        for start in range(0, len(self._bin), _CHUNK):
            chunk = self._bin[start : start + _CHUNK]
            lo, hi = chunk.min().item(), chunk.max().item()
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)
        return low, high

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of sequence ``i`` (a view of the memory map)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of length {size}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]


class IndexedDatasetBuilder:
    """Writes a .bin/.idx pair under temporary names; ``finalize`` renames them into place.

    An interrupted build leaves only hidden temporaries (``outputs.temp_sibling``), never a pair that looks
    finished; the next builder of the same prefix removes those whose process is gone (``kill -9`` included).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number] | np.dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        for path in (bin_path(prefix), idx_path(prefix)):
            remove_stale_temps(path)
        self._bin_tmp = temp_sibling(bin_path(prefix))
        self._idx_tmp = temp_sibling(idx_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self._documents: list[int] = [0]

    def add_document(self, tokens, sequence_lengths: list[int] | None = None) -> None:
        """Append one document; ``sequence_lengths`` splits it into several sequences (default: one)."""
        array = np.asarray(tokens, dtype=self.dtype)
        lengths = [len(array)] if sequence_lengths is None else list(sequence_lengths)
        if sum(lengths) != len(array):
            raise ValueError(f"sequence lengths sum to {sum(lengths)}, document has {len(array)} tokens")
        self._bin.write(array.tobytes(order="C"))
        self._lengths.extend(lengths)
        self._documents.append(len(self._lengths))

    def add_documents(self, tokens: np.ndarray, lengths) -> None:
        """Append many one-sequence documents at once: ``tokens`` is their concatenation."""
        array = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(array):
            raise ValueError(f"document lengths sum to {int(lengths.sum())}, got {len(array)} tokens")
        self._bin.write(array.tobytes(order="C"))
        base = len(self._lengths)
        self._lengths.extend(lengths.tolist())
        self._documents.extend(range(base + 1, base + len(lengths) + 1))

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append every document of a finished dataset (used to merge parallel workers' outputs)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{idx_path(prefix)}: dtype {other.dtype} differs from {self.dtype}")
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._documents.extend((other.document_indices[1:] + base).tolist())
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, length=16 << 20)

    def finalize(self) -> None:
        """Write the index and move both files into place (.idx last)."""
        self._bin.close()
        idx_tmp = self._idx_tmp
        write_index(idx_tmp, self.dtype, np.array(self._lengths, dtype=np.int32), np.array(self._documents))
        # Drop a stale index first so an interruption never pairs a new .bin with an old .idx.
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
