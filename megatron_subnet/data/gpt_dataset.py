"""GPT pretraining samples over Megatron .bin/.idx data, with Megatron-LM's semantics.

A sample is ``seq_length + 1`` consecutive tokens of one long token stream: the dataset's documents
(Megatron's unit, one ``.idx`` sequence each), shuffled once per epoch and concatenated. Sample ``k``
starts at token ``k * seq_length``, so neighbouring samples share one token (the last label of one
is the first input of the next), and samples run across document boundaries. Three index arrays
describe this and are cached as ``.npy`` files keyed by a hash of everything that shapes them:

- ``document_index``: document ids, epoch after epoch, each epoch a fresh permutation;
- ``sample_index``: ``(position in document_index, token offset)`` of the token where each sample starts;
  sample ``k`` ends with the token row ``k + 1`` points at. It covers whole blocks of
  ``samples_per_epoch`` samples, enough for ``num_samples``;
- ``shuffle_index`` (``num_samples`` entries): the samples in training order, each block permuted within
  itself; ``ds[i]`` is sample ``shuffle_index[i]``.

Each epoch's document order and each block's permutation come from the seed and their own number alone, so
the first ``n`` samples do not depend on ``num_samples``: a 40-step run sees the 24-step run's data first
(runs of different lengths are paired), and a finished run can be extended.

``BlendedDataset`` mixes several datasets by weight with Megatron's greedy "most behind its share"
rule, ``build_train_valid_test_datasets`` is Megatron's builder for ``--data-path``/``--split``, and
``PretrainingSampler`` is Megatron's resumable sequential batch sampler.

Differences from Megatron-LM, on purpose: the document order is shuffled per epoch and the samples per
epoch-sized block (Megatron shuffles all epochs together, with a special case for the last one, so its
order depends on the run's length); ``--split`` divides
``.idx`` documents rather than sequences (the same thing for GPT data, one sequence per document),
and where Megatron's rounding breaks on tiny datasets (a negative boundary, documents for a 0% split)
the rounded cumulative fractions are used instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from megatron_subnet.data.indexed import IndexedDataset, idx_path
from megatron_subnet.outputs import write_file_atomically

CACHE_FORMAT_VERSION = 2
# The sample order's version, recorded by checkpoints and searches: 2 = independent of the number of samples
# (1: Megatron's, a function of it). A run or search of another order cannot resume on this one.
DATA_ORDER = 2
SPLIT_NAMES = ("train", "valid", "test")
OVERSAMPLE = 1.005  # Megatron's margin on each blended component so the blend never runs short


# ----------------------------------------------------------------------------- flags


def parse_data_path(tokens: str | Sequence[str]) -> list[tuple[float, str]]:
    """``--data-path``: one prefix, or ``weight prefix`` pairs; returns ``(weight, prefix)`` with weights summing to 1.

    A single string is split on whitespace (``"0.3 a 0.7 b"``).
    """
    items = tokens.split() if isinstance(tokens, str) else list(tokens)
    if not items:
        raise ValueError("--data-path: no dataset prefix given")
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ValueError(
            f"--data-path: expected one prefix or 'weight prefix' pairs like '0.3 a 0.7 b', "
            f"got {len(items)} items: {' '.join(items)}"
        )
    pairs = []
    for weight_text, prefix in zip(items[::2], items[1::2]):
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(
                f"--data-path: weight {weight_text!r} (for {prefix!r}) is not a number; "
                f"several prefixes need weights, like '0.3 a 0.7 b'"
            ) from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--data-path: weight {weight_text!r} for {prefix!r} must be finite and >= 0")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ValueError(f"--data-path: weights sum to {total}, need a positive sum")
    return [(w / total, p) for w, p in pairs]


def parse_split(split: str) -> tuple[float, float, float]:
    """``--split``: ``"949,50,1"`` (or ``"90/5/5"``, or fewer parts padded with 0) -> train/valid/test fractions."""
    parts = re.split(r"[,/]", split.strip())
    if not split.strip() or len(parts) > 3:
        raise ValueError(f"--split: expected up to three numbers like '949,50,1', got {split!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split: {split!r} has a part that is not a number (expected like '949,50,1')") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"--split: {split!r} must be finite numbers >= 0")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"--split: {split!r} sums to 0, need a positive sum")
    train, valid, test = (v / total for v in values)
    return train, valid, test


def get_split_indices(fractions: Sequence[float], num_documents: int) -> list[int]:
    """Boundaries ``[0, a, b, num_documents]`` of the contiguous train/valid/test document ranges.

    Megatron's rounding: round each share, then move all boundaries so the last is ``num_documents``.
    On tiny datasets that can give a negative boundary or documents for a 0% split; then the boundaries
    are the rounded cumulative fractions instead.
    """
    n = num_documents
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(n))))
    bounds = [0] + [b - (bounds[-1] - n) for b in bounds[1:]]
    ascending = all(0 <= a <= b <= n for a, b in zip(bounds, bounds[1:]))
    if ascending and all(f > 0 or a == b for f, a, b in zip(fractions, bounds, bounds[1:])):
        return bounds
    cumulative = [int(round(c * n)) for c in np.cumsum(fractions)[:-1]]
    return [0, *np.clip(np.maximum.accumulate(cumulative), 0, n).tolist(), n]


# ----------------------------------------------------------------------------- cache


def _write_atomic(path: str, data: np.ndarray | str) -> None:
    """Write through ``outputs.write_file_atomically``: readers see the whole file or none, and temporaries an
    interrupted (killed) build left are removed."""

    def fill(tmp) -> None:
        with open(tmp, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode())
            else:
                np.save(f, data)

    write_file_atomically(path, fill)


def _load_or_build(
    cache_dir: str | os.PathLike | None,
    description: dict[str, Any],
    build: Callable[[], dict[str, np.ndarray]],
    check: Callable[[dict[str, np.ndarray]], bool],
    kinds: Sequence[str],
) -> tuple[dict[str, np.ndarray], bool, dict[str, str]]:
    """Load the arrays ``kinds`` from ``cache_dir`` (memory-mapped) if present and valid, else build and save them.

    Returns ``(arrays, loaded_from_cache, paths)``. Files are named ``Class-name-HASH-kind.npy`` with HASH a
    sha256 prefix of ``description``; concurrent builders write identical files, so either rename wins.
    """
    if cache_dir is None:
        return build(), False, {}
    text = json.dumps(description, sort_keys=True, indent=1)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    stem = os.path.join(os.fspath(cache_dir), f"{description['class']}-{description['name']}-{digest}")
    paths = {kind: f"{stem}-{kind}.npy" for kind in kinds}
    if all(os.path.isfile(p) for p in paths.values()):
        try:
            arrays = {kind: np.load(p, mmap_mode="r") for kind, p in paths.items()}
            if check(arrays):
                return arrays, True, paths
        except (OSError, ValueError):
            pass  # truncated or foreign file: rebuild below
    arrays = build()
    os.makedirs(cache_dir, exist_ok=True)
    _write_atomic(f"{stem}-description.json", text)
    for kind, p in paths.items():
        _write_atomic(p, arrays[kind])
    return arrays, False, paths


# ----------------------------------------------------------------------------- GPT dataset


def samples_per_epoch(tokens_per_epoch: int, seq_length: int) -> int:
    """The samples one epoch's tokens hold (at least 1): the size of each block the shuffle permutes."""
    return max((tokens_per_epoch - 1) // seq_length, 1)


def build_gpt_indices(
    sequence_lengths: np.ndarray, document_ids: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> dict[str, np.ndarray]:
    """The document, sample and shuffle indices (see the module docstring), all int64.

    Epoch ``e``'s document order and block ``b``'s sample permutation are drawn from ``(seed, e)`` and
    ``(seed, b)`` alone, and the shuffle permutes whole blocks, so the first ``n`` samples are the same for
    every ``num_samples >= n``: runs of different lengths see the same data first."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    tokens_per_epoch = int(lengths[document_ids].sum())
    per_block = samples_per_epoch(tokens_per_epoch, seq_length)
    num_blocks = -(-num_samples // per_block)
    stream_samples = num_blocks * per_block
    # Sample k needs tokens up to position (k + 1) * seq_length inclusive.
    num_epochs = -(-(stream_samples * seq_length + 1) // tokens_per_epoch)
    document_index = np.concatenate(
        [np.random.default_rng([seed, 0, e]).permutation(document_ids) for e in range(num_epochs)]
    ).astype(np.int64)
    ends = np.cumsum(lengths[document_index])
    starts = np.arange(stream_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")  # skips empty documents
    offset = starts - (ends[position] - lengths[document_index[position]])
    blocks = [b * per_block + np.random.default_rng([seed, 1, b]).permutation(per_block) for b in range(num_blocks)]
    return {
        "document_index": document_index,
        "sample_index": np.stack([position, offset], axis=1),
        "shuffle_index": np.concatenate(blocks)[:num_samples].astype(np.int64),
    }


class GPTDataset:
    """``num_samples`` samples of ``seq_length + 1`` tokens from the documents ``document_ids`` of ``indexed``.

    ``ds[i]`` returns ``{"tokens": int64 array of seq_length + 1}`` (inputs ``tokens[:-1]``, labels
    ``tokens[1:]``). ``num_samples=None`` means one epoch. ``document_ids`` index ``indexed``'s sequences
    (one per document in GPT data). With ``cache_dir``, the indices are loaded from / saved to it and
    ``loaded_from_cache`` and ``cache_paths`` tell what happened.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        document_ids: np.ndarray | Sequence[int],
        num_samples: int | None,
        seq_length: int,
        seed: int,
        cache_dir: str | os.PathLike | None = None,
        name: str = "train",
    ):
        self.indexed = indexed
        self.document_ids = np.asarray(document_ids, dtype=np.int64)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name
        if self.seq_length < 1:
            raise ValueError(f"{name}: seq_length must be >= 1, got {seq_length}")
        if self.document_ids.ndim != 1 or len(self.document_ids) == 0:
            raise ValueError(f"{name}: document_ids must be a non-empty 1-D list")
        if self.document_ids.min() < 0 or self.document_ids.max() >= len(indexed):
            raise ValueError(f"{name}: document ids must lie in [0, {len(indexed)}) for {indexed.prefix}")
        tokens_per_epoch = int(indexed.sequence_lengths[self.document_ids].sum(dtype=np.int64))
        if num_samples is None:
            num_samples = (tokens_per_epoch - 1) // self.seq_length
        self.num_samples = int(num_samples)
        if tokens_per_epoch == 0 or self.num_samples < 1:
            raise ValueError(
                f"{name}: {tokens_per_epoch} tokens in {len(self.document_ids)} documents of {indexed.prefix} "
                f"give no samples (num_samples={num_samples}, seq_length={seq_length})"
            )
        stat = os.stat(idx_path(indexed.prefix))
        self.description = {
            "class": type(self).__name__,
            "version": CACHE_FORMAT_VERSION,
            "name": name,
            "prefix": os.path.realpath(indexed.prefix),
            "idx_bytes": stat.st_size,
            "idx_mtime_ns": stat.st_mtime_ns,
            "num_sequences": len(indexed),
            "num_tokens": indexed.num_tokens,
            "documents": [
                len(self.document_ids),
                int(self.document_ids[0]),
                int(self.document_ids[-1]),
                hashlib.sha256(self.document_ids.tobytes()).hexdigest(),
            ],
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
        }

        def check(a: dict[str, np.ndarray]) -> bool:
            per_block = samples_per_epoch(tokens_per_epoch, self.seq_length)
            stream_samples = -(-self.num_samples // per_block) * per_block
            return a["sample_index"].shape == (stream_samples + 1, 2) and a["shuffle_index"].shape == (
                self.num_samples,
            )

        arrays, self.loaded_from_cache, self.cache_paths = _load_or_build(
            cache_dir,
            self.description,
            lambda: build_gpt_indices(
                indexed.sequence_lengths, self.document_ids, self.num_samples, self.seq_length, self.seed
            ),
            check,
            ("document_index", "sample_index", "shuffle_index"),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = operator.index(i)
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.sample(int(self.shuffle_index[i]))

    def sample(self, k: int) -> dict[str, np.ndarray]:
        """Sample ``k`` in stream order (before the shuffle): tokens ``k*seq_length .. (k+1)*seq_length``."""
        (first, start), (last, end) = self.sample_index[k].tolist(), self.sample_index[k + 1].tolist()
        doc = self.document_index
        if first == last:
            parts = [self.indexed.get(int(doc[first]), start, end - start + 1)]
        else:
            parts = [self.indexed.get(int(doc[first]), start)]
            parts += [self.indexed.get(int(doc[p])) for p in range(first + 1, last)]
            parts.append(self.indexed.get(int(doc[last]), 0, end + 1))
        return {"tokens": np.concatenate(parts).astype(np.int64)}


# ----------------------------------------------------------------------------- blending


def build_blending_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blend: sample ``i`` comes from the dataset furthest behind its share,
    ``argmax(w * max(i, 1) - count)`` (first index on ties).
    Returns ``(dataset_index int16, dataset_sample_index int64)``.

    A plain loop over floats and lists (about 0.5 s per million samples for a few datasets); the
    numpy version would be slower, since each step depends on the previous one.
    """
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    which = [0] * num_samples
    nth = [0] * num_samples
    for i in range(num_samples):
        t = float(max(i, 1))
        best, best_error = 0, w[0] * t - counts[0]
        for d in range(1, len(w)):
            error = w[d] * t - counts[d]
            if error > best_error:
                best, best_error = d, error
        which[i] = best
        nth[i] = counts[best]
        counts[best] += 1
    return np.array(which, dtype=np.int16), np.array(nth, dtype=np.int64)


class BlendedDataset:
    """``num_samples`` samples drawn from ``datasets`` in proportion to ``weights`` (normalised here).

    ``ds[i]`` is ``datasets[dataset_index[i]][dataset_sample_index[i]]``; each dataset is read in its own
    order, 0, 1, 2, ... Caching needs every dataset to carry a ``description`` (GPTDataset does).
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[float],
        num_samples: int,
        cache_dir: str | os.PathLike | None = None,
        name: str = "train",
    ):
        if not datasets or len(datasets) != len(weights):
            raise ValueError(
                f"{name}: need one weight per dataset; got {len(datasets)} datasets, {len(weights)} weights"
            )
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError(f"{name}: at most {np.iinfo(np.int16).max} datasets can be blended")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"{name}: blend weights must be finite, >= 0, with a positive sum; got {list(weights)}")
        if num_samples < 1:
            raise ValueError(f"{name}: num_samples must be >= 1, got {num_samples}")
        self.datasets = list(datasets)
        self.weights = (w / w.sum()).tolist()
        self.num_samples = int(num_samples)
        self.name = name
        if cache_dir is not None and any(getattr(d, "description", None) is None for d in datasets):
            raise ValueError(f"{name}: caching a blend needs datasets with a 'description' (such as GPTDataset)")
        self.description = {
            "class": type(self).__name__,
            "version": CACHE_FORMAT_VERSION,
            "name": name,
            "datasets": [getattr(d, "description", None) for d in datasets],
            "weights": self.weights,
            "num_samples": self.num_samples,
        }

        def build() -> dict[str, np.ndarray]:
            which, nth = build_blending_indices(self.weights, self.num_samples)
            return {"dataset_index": which, "dataset_sample_index": nth}

        arrays, self.loaded_from_cache, self.cache_paths = _load_or_build(
            cache_dir,
            self.description,
            build,
            lambda a: all(x.shape == (self.num_samples,) for x in a.values()),
            ("dataset_index", "dataset_sample_index"),
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, dataset in enumerate(self.datasets):
            if needed[d] > len(dataset):
                raise ValueError(f"{name}: blend draws {needed[d]} samples from dataset {d}, which has {len(dataset)}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Any:
        i = operator.index(i)
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


# ----------------------------------------------------------------------------- builder


def build_train_valid_test_datasets(
    data_path: str | Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """Megatron's builder: ``(train, valid, test)`` from ``--data-path`` and ``--split``.

    Each prefix's documents are split into contiguous ranges by ``split``. With one prefix a split is a
    GPTDataset of exactly its ``num_samples``; with several it is a BlendedDataset whose components hold
    ``ceil(n * weight * 1.005)`` samples. A split gets None when its fraction or its ``num_samples`` is
    0; a prefix whose range for a split is empty (tiny data) is left out of that split with a warning.
    """
    blend = [(w, p) for w, p in parse_data_path(data_path) if w > 0]
    fractions = parse_split(split)
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three counts >= 0 (train, valid, test), got {num_samples}")
    ranges = []  # per prefix: (weight, indexed, sequence ranges of the three splits)
    for weight, prefix in blend:
        indexed = IndexedDataset(prefix)
        bounds = get_split_indices(fractions, len(indexed.document_indices) - 1)
        sequence_bounds = indexed.document_indices[bounds].tolist()
        ranges.append((weight, indexed, list(zip(sequence_bounds[:-1], sequence_bounds[1:]))))
    result = []
    for s, split_name in enumerate(SPLIT_NAMES):
        n = int(num_samples[s])
        if fractions[s] == 0 or n == 0:
            result.append(None)
            continue
        members = []
        for weight, indexed, split_ranges in ranges:
            first, last = split_ranges[s]
            if last > first:
                members.append((weight, indexed, np.arange(first, last, dtype=np.int64)))
            else:
                warnings.warn(f"--split {split}: {indexed.prefix} has no {split_name} documents", stacklevel=2)
        if not members:
            result.append(None)
        elif len(members) == 1:
            _, indexed, ids = members[0]
            result.append(GPTDataset(indexed, ids, n, seq_length, seed, cache_dir, split_name))
        else:
            total = sum(w for w, _, _ in members)
            weights = [w / total for w, _, _ in members]
            parts = [
                GPTDataset(indexed, ids, math.ceil(n * w * OVERSAMPLE), seq_length, seed, cache_dir, split_name)
                for w, (_, indexed, ids) in zip(weights, members)
            ]
            result.append(BlendedDataset(parts, weights, n, cache_dir, split_name))
    return tuple(result)


# ----------------------------------------------------------------------------- sampler


class PretrainingSampler:
    """Megatron's pretraining batch sampler: sequential sample ids from ``consumed_samples`` to ``total_samples``.

    Each step covers ``micro_batch_size * data_parallel_size`` consecutive ids and yields this rank's
    ``micro_batch_size`` of them; a last, incomplete step is dropped. Resuming with ``consumed_samples``
    from a checkpoint continues exactly where the run stopped. Use as a DataLoader ``batch_sampler``.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        if total_samples < 1:
            raise ValueError(f"total_samples must be >= 1, got {total_samples}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} must lie in [0, total_samples={total_samples}]")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(
                f"micro_batch_size {micro_batch_size} and data_parallel_size {data_parallel_size} must be >= 1"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} must lie in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[list[int]]:
        first = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - self.step + 1, self.step):
            yield list(range(start + first, start + first + self.micro_batch_size))
