"""GPT dataset indices, split, blending, cache and sampler (megatron_subnet.data.gpt_dataset)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from megatron_subnet.data.gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    PretrainingSampler,
    build_blending_indices,
    build_train_valid_test_datasets,
    get_split_indices,
    parse_data_path,
    parse_split,
    samples_per_epoch,
)
from megatron_subnet.data.indexed import IndexedDataset, IndexedDatasetBuilder

SEQ = 16


def make_prefix(path, num_docs: int, seed: int, max_len: int = 3 * SEQ, split_docs: bool = False):
    """A random dataset at ``path``; returns (prefix, per-sequence token arrays).

    Lengths are random in [1, max_len], with a length-1 document, one longer than 2 * SEQ and one empty
    one. ``split_docs`` stores each document as two sequences.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=num_docs)
    lengths[0], lengths[min(1, num_docs - 1)] = 1, 2 * SEQ + 3
    if num_docs > 3:
        lengths[3] = 0
    sequences = []
    with IndexedDatasetBuilder(path, np.uint16) as builder:
        for n in lengths:
            doc = rng.integers(0, 60000, size=n).astype(np.uint16)
            cut = [n // 2, n - n // 2] if split_docs else None
            builder.add_document(doc, sequence_lengths=cut)
            sequences += [doc[: n // 2], doc[n // 2 :]] if split_docs else [doc]
    return str(path), sequences


@pytest.fixture
def corpus(tmp_path):
    return make_prefix(tmp_path / "corpus", num_docs=60, seed=0)


# ----------------------------------------------------------------------------- 1. samples


@pytest.mark.parametrize("ids", [slice(None), slice(10, 30)])
def test_samples_are_slices_of_the_epoch_stream(corpus, ids):
    prefix, docs = corpus
    indexed = IndexedDataset(prefix)
    doc_ids = np.arange(len(docs))[ids]
    tokens_per_epoch = sum(len(docs[d]) for d in doc_ids)
    num_samples = 3 * tokens_per_epoch // SEQ  # about three epochs
    ds = GPTDataset(indexed, doc_ids, num_samples, SEQ, seed=1234)
    assert len(ds) == num_samples

    # Each epoch of the document index is a permutation of the documents.
    epochs = ds.document_index.reshape(-1, len(doc_ids))
    assert len(epochs) >= 3
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), doc_ids)
    assert not all(np.array_equal(e, epochs[0]) for e in epochs[1:])  # reshuffled each epoch

    stream = np.concatenate([docs[d] for d in ds.document_index]).astype(np.int64)
    for k in range(num_samples):
        sample = ds.sample(k)["tokens"]
        assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)
        np.testing.assert_array_equal(sample, stream[k * SEQ : k * SEQ + SEQ + 1], err_msg=f"sample {k}")

    # The shuffle permutes blocks of one epoch's samples; ds takes the first num_samples of the whole blocks.
    per_block = samples_per_epoch(tokens_per_epoch, SEQ)
    whole = GPTDataset(indexed, doc_ids, -(-num_samples // per_block) * per_block, SEQ, seed=1234)
    np.testing.assert_array_equal(ds.shuffle_index, whole.shuffle_index[:num_samples])
    for start in range(0, len(whole), per_block):
        block = whole.shuffle_index[start : start + per_block]
        np.testing.assert_array_equal(np.sort(block), np.arange(start, start + per_block))
        assert not np.array_equal(block, np.arange(start, start + per_block))
    for i in (0, 1, num_samples // 2, num_samples - 1, -1):
        np.testing.assert_array_equal(ds[i]["tokens"], ds.sample(int(ds.shuffle_index[i]))["tokens"])
    with pytest.raises(IndexError):
        ds[num_samples]


def test_one_epoch_by_default_and_bad_arguments(corpus):
    prefix, docs = corpus
    indexed = IndexedDataset(prefix)
    total = sum(len(d) for d in docs)
    ds = GPTDataset(indexed, np.arange(len(docs)), None, SEQ, seed=0)
    assert len(ds) == (total - 1) // SEQ
    np.testing.assert_array_equal(np.sort(ds.document_index), np.arange(len(docs)))  # exactly one epoch
    with pytest.raises(ValueError, match="seq_length"):
        GPTDataset(indexed, np.arange(4), 10, 0, seed=0)
    with pytest.raises(ValueError, match="document ids"):
        GPTDataset(indexed, [0, len(docs)], 10, SEQ, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        GPTDataset(indexed, [3], 10, SEQ, seed=0)  # the empty document


# ----------------------------------------------------------------------------- 2. split


@pytest.mark.parametrize("split", ["949,50,1", "1,0,0", "80,20,0", "1,1,1", "90/5/5", "0,1,1"])
def test_split_partitions_the_documents(tmp_path, split):
    num_docs = 1000
    prefix, _ = make_prefix(tmp_path / "big", num_docs=num_docs, seed=3, max_len=8)
    fractions = parse_split(split)
    bounds = get_split_indices(fractions, num_docs)
    datasets = build_train_valid_test_datasets([prefix], split, 4, seed=1, num_samples=(20, 5, 5), cache_dir=None)
    seen = []
    for s, ds in enumerate(datasets):
        if fractions[s] == 0 or bounds[s + 1] == bounds[s]:
            assert ds is None
            continue
        assert isinstance(ds, GPTDataset) and len(ds) == (20, 5, 5)[s]
        np.testing.assert_array_equal(ds.document_ids, np.arange(bounds[s], bounds[s + 1]))
        assert abs(len(ds.document_ids) - fractions[s] * num_docs) <= 1
        seen.append(ds.document_ids)
    all_ids = np.concatenate(seen)
    assert len(np.unique(all_ids)) == len(all_ids)  # disjoint
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(num_docs))  # covering


def test_split_indices_always_partition():
    assert get_split_indices(parse_split("949,50,1"), 1000) == [0, 949, 999, 1000]
    assert get_split_indices(parse_split("90,9,1"), 1000) == [0, 900, 990, 1000]
    rng = np.random.default_rng(0)
    for n in range(0, 40):
        for _ in range(20):
            raw = rng.integers(0, 4, size=3) * rng.random(3).round(1)
            if raw.sum() == 0:
                continue
            fractions = raw / raw.sum()
            bounds = get_split_indices(fractions, n)
            assert bounds[0] == 0 and bounds[-1] == n and np.all(np.diff(bounds) >= 0), (fractions, n, bounds)
            for s in range(3):
                if fractions[s] == 0:
                    assert bounds[s + 1] == bounds[s]
    # Megatron's own rounding would give [0, -1, 1, 3] and [0, 1, 1, 1] here.
    assert get_split_indices(parse_split("0,1,1"), 3) == [0, 0, 2, 3]
    assert get_split_indices(parse_split("0,1,1"), 1) == [0, 0, 0, 1]


def test_split_follows_documents_not_sequences(tmp_path):
    prefix, _ = make_prefix(tmp_path / "two", num_docs=100, seed=4, max_len=8, split_docs=True)
    indexed = IndexedDataset(prefix)
    train, valid, _ = build_train_valid_test_datasets(prefix, "80,20,0", 4, seed=1, num_samples=(10, 10, 0))
    assert train.document_ids[-1] + 1 == valid.document_ids[0] == indexed.document_indices[80] == 160
    assert valid.document_ids[-1] + 1 == len(indexed)


# ----------------------------------------------------------------------------- 3. blending


def megatron_blend_reference(weights, n):
    """Megatron's helpers.cpp rule, written the slow obvious way."""
    counts = np.zeros(len(weights))
    which = []
    for i in range(n):
        d = int(np.argmax(np.asarray(weights) * max(i, 1) - counts))
        which.append(d)
        counts[d] += 1
    return np.array(which)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.3, 0.5], [0.5, 0.25, 0.125, 0.125]])
def test_blending_indices_follow_weights(weights):
    n = 10_000
    which, nth = build_blending_indices(weights, n)
    assert which.dtype == np.int16 and nth.dtype == np.int64
    np.testing.assert_array_equal(which[:2000], megatron_blend_reference(weights, 2000))
    counts = np.bincount(which, minlength=len(weights))
    for d, w in enumerate(weights):
        assert abs(counts[d] / n - w) < 0.01
        assert abs(counts[d] - w * n) <= 2
        np.testing.assert_array_equal(nth[which == d], np.arange(counts[d]))  # each dataset read in order
        prefix_counts = np.cumsum(which == d)
        assert np.all(np.abs(prefix_counts - w * np.arange(1, n + 1)) <= 2)  # balanced all along


def test_blended_datasets_from_data_path(tmp_path):
    prefixes = [make_prefix(tmp_path / f"p{i}", num_docs=30, seed=10 + i)[0] for i in range(3)]
    data_path = ["2", prefixes[0], "3", prefixes[1], "5", prefixes[2]]
    assert [w for w, _ in parse_data_path(data_path)] == pytest.approx([0.2, 0.3, 0.5])
    n = 10_000
    train, valid, test = build_train_valid_test_datasets(
        data_path, "90,10,0", SEQ, seed=7, num_samples=(n, 100, 100), cache_dir=tmp_path / "cache"
    )
    assert test is None
    for ds, size in ((train, n), (valid, 100)):
        assert isinstance(ds, BlendedDataset) and len(ds) == size
        for part, w in zip(ds.datasets, (0.2, 0.3, 0.5)):
            assert len(part) == math.ceil(size * w * 1.005)
    shares = np.bincount(train.dataset_index, minlength=3) / n
    np.testing.assert_allclose(shares, [0.2, 0.3, 0.5], atol=0.01)
    for i in (0, 1, 2, 5000, n - 1):
        d, k = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        np.testing.assert_array_equal(train[i]["tokens"], train.datasets[d][k]["tokens"])


def test_blend_that_would_run_short_is_refused(corpus):
    prefix, docs = corpus
    indexed = IndexedDataset(prefix)
    small = GPTDataset(indexed, np.arange(len(docs)), 10, SEQ, seed=0)
    big = GPTDataset(indexed, np.arange(len(docs)), 1000, SEQ, seed=0)
    with pytest.raises(ValueError, match="draws"):
        BlendedDataset([small, big], [0.5, 0.5], 100)


# ----------------------------------------------------------------------------- 4. cache


def test_cache_roundtrip_and_invalidation(corpus, tmp_path):
    prefix, docs = corpus
    indexed = IndexedDataset(prefix)
    cache = tmp_path / "cache"
    args = dict(indexed=indexed, document_ids=np.arange(len(docs)), num_samples=200, seq_length=SEQ, seed=5)
    first = GPTDataset(**args, cache_dir=cache)
    assert not first.loaded_from_cache
    assert sorted(first.cache_paths) == ["document_index", "sample_index", "shuffle_index"]
    assert all(os.path.isfile(p) for p in first.cache_paths.values())

    second = GPTDataset(**args, cache_dir=cache)
    assert second.loaded_from_cache and second.cache_paths == first.cache_paths
    assert isinstance(second.sample_index, np.memmap)
    for kind in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(second, kind), getattr(first, kind))
    np.testing.assert_array_equal(second[7]["tokens"], first[7]["tokens"])

    for change in ({"seq_length": SEQ + 1}, {"seed": 6}, {"num_samples": 201}, {"document_ids": np.arange(50)}):
        other = GPTDataset(**{**args, **change}, cache_dir=cache)
        assert not other.loaded_from_cache, change
        assert set(other.cache_paths.values()).isdisjoint(first.cache_paths.values()), change
        assert GPTDataset(**{**args, **change}, cache_dir=cache).loaded_from_cache, change
    assert not GPTDataset(**args, cache_dir=cache, name="valid").loaded_from_cache

    # A truncated cache file is rebuilt, not trusted.
    with open(first.cache_paths["sample_index"], "r+b") as f:
        f.truncate(40)
    again = GPTDataset(**args, cache_dir=cache)
    assert not again.loaded_from_cache
    np.testing.assert_array_equal(again.sample_index, first.sample_index)
    assert not [p for p in os.listdir(cache) if ".tmp-" in p]  # no temporaries left behind


def test_cache_sees_a_rewritten_dataset(tmp_path):
    cache = tmp_path / "cache"
    prefix, docs = make_prefix(tmp_path / "d", num_docs=20, seed=0)
    ds = GPTDataset(IndexedDataset(prefix), np.arange(20), 50, SEQ, seed=0, cache_dir=cache)
    prefix, docs = make_prefix(tmp_path / "d", num_docs=20, seed=1)
    rebuilt = GPTDataset(IndexedDataset(prefix), np.arange(20), 50, SEQ, seed=0, cache_dir=cache)
    assert not rebuilt.loaded_from_cache and rebuilt.cache_paths != ds.cache_paths


def test_cache_write_removes_temporaries_of_a_killed_build(corpus, tmp_path, capsys):
    import subprocess
    import sys

    from megatron_subnet.outputs import temp_sibling

    prefix, docs = corpus
    cache = tmp_path / "cache"
    args = dict(indexed=IndexedDataset(prefix), document_ids=np.arange(len(docs)), num_samples=50, seq_length=SEQ,
                seed=0, cache_dir=cache)
    first = GPTDataset(**args)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid now names a process that is gone, as a build killed mid-write left it
    path = first.cache_paths["sample_index"]
    leftover = temp_sibling(path).with_name(temp_sibling(path).name.replace(f"-{os.getpid()}-", f"-{proc.pid}-"))
    leftover.write_bytes(b"half written")
    os.remove(path)
    rebuilt = GPTDataset(**args)
    assert not rebuilt.loaded_from_cache and not leftover.exists()
    assert f"removed {leftover}" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(path), first.sample_index)
    assert not [p for p in os.listdir(cache) if ".tmp-" in p]


def test_blended_cache(tmp_path):
    cache = tmp_path / "cache"
    prefixes = [make_prefix(tmp_path / f"p{i}", num_docs=20, seed=i)[0] for i in range(2)]
    build = lambda n: build_train_valid_test_datasets(  # noqa: E731
        ["0.3", prefixes[0], "0.7", prefixes[1]], "1,0,0", SEQ, seed=3, num_samples=(n, 0, 0), cache_dir=cache
    )
    first, valid, test = build(500)
    assert valid is None and test is None
    assert not first.loaded_from_cache and not any(d.loaded_from_cache for d in first.datasets)
    second = build(500)[0]
    assert second.loaded_from_cache and all(d.loaded_from_cache for d in second.datasets)
    np.testing.assert_array_equal(second.dataset_index, first.dataset_index)
    np.testing.assert_array_equal(second.dataset_sample_index, first.dataset_sample_index)
    third = build(600)[0]
    assert not third.loaded_from_cache and third.cache_paths != first.cache_paths


# ----------------------------------------------------------------------------- 5. determinism


def test_same_seed_same_order_other_seed_other_order(corpus):
    prefix, docs = corpus
    indexed = IndexedDataset(prefix)
    make = lambda seed: GPTDataset(indexed, np.arange(len(docs)), 300, SEQ, seed=seed)  # noqa: E731
    a, b, c = make(11), make(11), make(12)
    for kind in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, kind), getattr(b, kind))
    assert [a[i]["tokens"].tolist() for i in range(50)] == [b[i]["tokens"].tolist() for i in range(50)]
    assert not np.array_equal(a.document_index, c.document_index)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    assert [a[i]["tokens"].tolist() for i in range(50)] != [c[i]["tokens"].tolist() for i in range(50)]


def test_a_longer_run_sees_the_shorter_runs_samples_first(tmp_path):
    """The order depends on the seed alone, not on num_samples: the first n samples of a run are the same for
    every length >= n, for one dataset (across epochs) and for a blend (across its components)."""
    prefixes = [make_prefix(tmp_path / f"p{i}", num_docs=20, seed=i)[0] for i in range(2)]
    build = lambda n: build_train_valid_test_datasets(  # noqa: E731
        ["0.3", prefixes[0], "0.7", prefixes[1]], "1,0,0", SEQ, seed=3, num_samples=(n, 0, 0)
    )[0]
    indexed = IndexedDataset(prefixes[0])
    per_block = samples_per_epoch(int(indexed.sequence_lengths.sum()), SEQ)
    for short, long in ((40, 96), (per_block + 3, 3 * per_block + 1)):
        one = [GPTDataset(indexed, np.arange(len(indexed)), n, SEQ, seed=5) for n in (short, long)]
        blend = [build(n) for n in (short, long)]
        for a, b in (one, blend):
            assert [a[i]["tokens"].tolist() for i in range(short)] == [b[i]["tokens"].tolist() for i in range(short)]
        assert one[0].shuffle_index.tolist() != sorted(one[0].shuffle_index.tolist())


# ----------------------------------------------------------------------------- 6. sampler


def test_sampler_resumes_exactly_and_splits_ranks():
    total, micro, dp = 1003, 4, 3
    step = micro * dp
    full = {r: list(PretrainingSampler(total, 0, micro, r, dp)) for r in range(dp)}
    assert all(len(full[r]) == total // step == len(PretrainingSampler(total, 0, micro, r, dp)) for r in range(dp))
    for j in range(len(full[0])):
        batches = [full[r][j] for r in range(dp)]
        assert all(len(b) == micro for b in batches)
        union = sorted(i for b in batches for i in b)
        assert union == list(range(j * step, (j + 1) * step))  # disjoint and covering the global batch
    for k in (0, 1, 7, len(full[0]) - 1, len(full[0])):
        for r in range(dp):
            resumed = list(PretrainingSampler(total, k * step, micro, r, dp))
            assert resumed == full[r][k:]
    # Resuming mid-way through a global batch still continues sample by sample.
    assert list(PretrainingSampler(total, 5, micro, 0, dp))[0] == [5, 6, 7, 8]


@pytest.mark.parametrize(
    "args", [(0, 0, 1, 0, 1), (10, 11, 1, 0, 1), (10, 0, 0, 0, 1), (10, 0, 1, 2, 2), (10, 0, 1, -1, 2)]
)
def test_sampler_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        PretrainingSampler(*args)


# ----------------------------------------------------------------------------- 7. flags


def test_parse_good_flags():
    assert parse_data_path(["data/a"]) == [(1.0, "data/a")]
    assert parse_data_path(["3", "a", "1", "b"]) == [(0.75, "a"), (0.25, "b")]
    assert parse_data_path("0.3 a 0.7 b") == [(0.3, "a"), (0.7, "b")]
    assert parse_split("949,50,1") == pytest.approx((0.949, 0.05, 0.001))
    assert parse_split("90/10") == pytest.approx((0.9, 0.1, 0.0))
    assert parse_split("1") == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "tokens",
    [
        [],
        ["0.3", "a", "0.7"],
        ["a", "b"],
        ["x", "a", "0.7", "b"],
        ["0", "a", "0", "b"],
        ["-1", "a", "2", "b"],
        ["nan", "a", "1", "b"],
        ["inf", "a", "1", "b"],
    ],
)
def test_bad_data_path(tokens):
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(tokens)


@pytest.mark.parametrize("split", ["", "  ", "a,b,c", "1,2,3,4", "0,0,0", "-1,2,1", "1,,2", "nan,1,1", "90;5;5"])
def test_bad_split(split):
    with pytest.raises(ValueError, match="--split"):
        parse_split(split)


def test_builder_reports_flag_errors(corpus):
    prefix, _ = corpus
    with pytest.raises(ValueError, match="--split"):
        build_train_valid_test_datasets([prefix], "90,x", SEQ, 0, (1, 1, 1))
    with pytest.raises(ValueError, match="--data-path"):
        build_train_valid_test_datasets(["0.5", prefix, "b"], "1", SEQ, 0, (1, 1, 1))
