"""The .bin/.idx format: byte-exact against the spec and against Megatron-LM's own implementation."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatron_subnet.data import indexed
from megatron_subnet.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    dataset_exists,
    token_dtype,
)


def build(prefix, docs, dtype):
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(d)
    return IndexedDataset(prefix)


def test_idx_bytes_match_the_spec(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10]]
    build(tmp_path / "d", docs, np.uint16)
    expected = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
    expected += struct.pack("<Q", 3) + struct.pack("<Q", 4)
    expected += struct.pack("<3i", 3, 1, 2)  # sequence lengths (int32)
    expected += struct.pack("<3q", 0, 6, 8)  # byte pointers (int64): uint16 tokens are 2 bytes
    expected += struct.pack("<4q", 0, 1, 2, 3)  # document indices (int64)
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<6H", 5, 6, 7, 8, 9, 10)


@pytest.mark.parametrize("vocab_size", [50_000, 70_000])
def test_round_trip(tmp_path, vocab_size):
    dtype = token_dtype(vocab_size)
    assert dtype == (np.uint16 if vocab_size < 65500 else np.int32)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab_size, rng.integers(0, 50)) for _ in range(100)]
    docs[3] = np.array([vocab_size - 1, 0])
    ds = build(tmp_path / "d", docs, dtype)
    assert len(ds) == 100 and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, np.arange(101))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.get(3, 1, 1), [0])
    long = next(i for i, d in enumerate(docs) if len(d) > 10)
    np.testing.assert_array_equal(ds.get(long, 4, 5), docs[long][4:9])
    np.testing.assert_array_equal(ds[-1], docs[-1])
    with pytest.raises(IndexError):
        ds.get(long, len(docs[long]) - 1, 2)
    with pytest.raises(IndexError):
        ds[100]


def test_documents_with_several_sequences(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d", np.int32) as b:
        b.add_document([1, 2, 3, 4, 5], sequence_lengths=[2, 3])
        b.add_document([6])
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 3
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3])
    np.testing.assert_array_equal(ds[1], [3, 4, 5])


def test_merge_equals_single_build(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, rng.integers(1, 30)) for _ in range(40)]
    build(tmp_path / "all", docs, np.uint16)
    build(tmp_path / "a", docs[:15], np.uint16)
    build(tmp_path / "b", docs[15:], np.uint16)
    with IndexedDatasetBuilder(tmp_path / "merged", np.uint16) as b:
        b.add_index(tmp_path / "a")
        b.add_index(tmp_path / "b")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"all.{ext}").read_bytes()
    build(tmp_path / "wide", docs[:2], np.int32)
    with pytest.raises(IndexedDatasetError, match="dtype"):
        IndexedDatasetBuilder(tmp_path / "x", np.uint16).add_index(tmp_path / "wide")


def test_batched_documents_equal_one_by_one(tmp_path):
    docs = [[1, 2], [], [3, 4, 5]]
    build(tmp_path / "one", docs, np.uint16)
    with IndexedDatasetBuilder(tmp_path / "batch", np.uint16) as b:
        b.add_documents(np.array([1, 2, 3, 4, 5]), [2, 0, 3])
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"batch.{ext}").read_bytes()


def test_corrupt_files_give_clear_errors(tmp_path):
    build(tmp_path / "d", [[1, 2, 3], [4]], np.uint16)
    idx = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(idx[:-3])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: index is"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"NOTANIDX!" + idx[9:])
    with pytest.raises(IndexedDatasetError, match="magic"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(idx[:10])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(idx)
    (tmp_path / "d.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: 6 bytes"):
        IndexedDataset(tmp_path / "d")
    with pytest.raises(IndexedDatasetError, match="no such file"):
        IndexedDataset(tmp_path / "missing")


def test_interrupted_build_leaves_no_finished_pair(tmp_path):
    build(tmp_path / "d", [[1, 2]], np.uint16)
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
            b.add_document([7, 7, 7])
            raise RuntimeError("killed")
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "d")[0], [1, 2])  # the old pair is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    b = IndexedDatasetBuilder(tmp_path / "new", np.uint16)
    b.add_document([1])
    assert not dataset_exists(tmp_path / "new")  # nothing under the final names until finalize
    b.finalize()
    assert dataset_exists(tmp_path / "new")


def test_files_are_interchangeable_with_megatron_lm(tmp_path):
    import megatron.core.datasets.indexed_dataset as mcore  # the reference implementation (a test dependency)
    import torch

    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 60_000, rng.integers(1, 40)) for _ in range(25)]
    ours = build(tmp_path / "ours", docs, np.uint16)

    theirs = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for d in docs:
        theirs.add_document(torch.tensor(d.astype(np.int64)), [len(d)])
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()

    read_by_megatron = mcore.IndexedDataset(str(tmp_path / "ours"))
    assert len(read_by_megatron) == len(ours)
    for i in range(len(docs)):
        np.testing.assert_array_equal(read_by_megatron[i], docs[i])
    np.testing.assert_array_equal(read_by_megatron.document_indices, ours.document_indices)


def _rewrite_index(path, lengths, pointers, documents, code=8):
    """An .idx with exactly these arrays (the writer would derive the pointers itself)."""
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(lengths), len(documents))
    body = np.asarray(lengths, np.int32).tobytes() + np.asarray(pointers, np.int64).tobytes()
    path.write_bytes(header + body + np.asarray(documents, np.int64).tobytes())


@pytest.mark.parametrize("chunk", [None, 2])  # 2: the check also holds across its vectorised chunks
def test_index_with_wrong_pointers_or_lengths_is_refused(tmp_path, monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(indexed, "_CHUNK", chunk)
    build(tmp_path / "d", [[1, 2, 3], [4], [5, 6], [7]], np.uint16)
    idx = tmp_path / "d.idx"
    good = idx.read_bytes()
    cases = [
        ([3, 1, 2, 1], [0, 6, 2, 12], r"sequence 2 points at byte 2 of the \.bin, but .* byte 8"),  # into doc 0
        ([3, 1, 2, 1], [0, 6, 8, 100], r"sequence 3 points at byte 100 of the \.bin, but .* byte 12"),  # past end
        ([3, 1, -2, 5], [0, 6, 8, 4], r"sequence 2 has a negative length \(-2\)"),  # sizes still add up
    ]
    for lengths, pointers, message in cases:
        _rewrite_index(idx, lengths, pointers, [0, 1, 2, 3, 4])
        with pytest.raises(IndexedDatasetError, match=rf"d\.idx: {message}"):
            IndexedDataset(tmp_path / "d")
    idx.write_bytes(good)
    assert IndexedDataset(tmp_path / "d")[2].tolist() == [5, 6]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_token_range_is_the_min_and_max_of_the_bin(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(indexed, "_CHUNK", 7)  # several chunks, the last one short
    rng = np.random.default_rng(3)
    low = -5 if dtype == np.int32 else 0  # signed dtypes can hold negative ids: the range must show them
    docs = [rng.integers(low, 1000, rng.integers(0, 20)) for _ in range(30)]
    ds = build(tmp_path / "d", docs, dtype)
    tokens = np.concatenate(docs).astype(dtype)
    assert ds.token_range() == (int(tokens.min()), int(tokens.max()))
    assert all(isinstance(v, int) for v in ds.token_range())
    assert build(tmp_path / "empty", [[], []], dtype).token_range() is None


def test_builder_removes_temporaries_of_killed_builds(tmp_path, capsys):
    import subprocess
    import sys

    from megatron_subnet.outputs import temp_sibling

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    new_style = temp_sibling(tmp_path / "d.bin").name.replace(f"-{os.getpid()}-", f"-{dead}-")
    live = temp_sibling(tmp_path / "d.idx").name.replace(f"-{os.getpid()}-", "-1-")  # pid 1 is alive
    leftovers = [new_style, f"d.bin.tmp-{dead}", f"d.idx.tmp-{dead}"]  # the last two: the naming of older releases
    for name in [*leftovers, live]:
        (tmp_path / name).write_bytes(b"half written")
    build(tmp_path / "d", [[1, 2]], np.uint16)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, "d.bin", "d.idx"])
    err = capsys.readouterr().err
    assert all(f"removed {tmp_path / name}" in err for name in leftovers)
