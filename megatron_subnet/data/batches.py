"""Fixed token batches from one split: what evaluation, importance and search fitness all score on."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from megatron_subnet.data.gpt_dataset import SPLIT_NAMES, GPTDataset, build_train_valid_test_datasets, parse_data_path
from megatron_subnet.data.indexed import IndexedDataset, dataset_exists


def load_batches(
    data_path: Sequence[str] | str,
    split: str,
    split_name: str,
    seq_length: int,
    micro_batch_size: int,
    num_batches: int,
    seed: int,
) -> list[torch.Tensor]:
    """The first ``num_batches`` token batches ``[micro_batch_size, seq_length + 1]`` of one split."""
    prefixes = [data_path] if isinstance(data_path, str) else list(data_path)
    for prefix in prefixes[1::2] if len(prefixes) > 1 else prefixes:
        if not dataset_exists(prefix):
            raise FileNotFoundError(f"--data-path {prefix}: no such file {prefix}.bin/.idx")
    n = num_batches * micro_batch_size
    counts = [n if name == split_name else 0 for name in SPLIT_NAMES]
    dataset = build_train_valid_test_datasets(prefixes, split, seq_length, seed, counts)[SPLIT_NAMES.index(split_name)]
    if dataset is None:
        raise ValueError(f"--split {split}: no {split_name} documents in --data-path")
    if isinstance(dataset, GPTDataset):
        distinct = (int(dataset.indexed.sequence_lengths[dataset.document_ids].sum(dtype=np.int64)) - 1) // seq_length
        if distinct < n:
            print(f"warning: the {split_name} split holds {distinct} samples of {seq_length} tokens; "
                  f"{n} requested, so some repeat", file=sys.stderr)
    samples = [torch.from_numpy(np.asarray(dataset[i]["tokens"], dtype=np.int64)) for i in range(n)]
    return [torch.stack(samples[k : k + micro_batch_size]) for k in range(0, n, micro_batch_size)]


def check_vocab(batches: list[torch.Tensor], vocab_size: int) -> None:
    """ValueError when a token id does not fit the model's vocabulary (negative ids included)."""
    top = max(int(b.max()) for b in batches)
    bottom = min(int(b.min()) for b in batches)
    if top >= vocab_size or bottom < 0:
        bad = top if top >= vocab_size else bottom
        raise ValueError(
            f"--data-path: token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
            "(data tokenized for another model?)"
        )


def check_token_ids(data_path: Sequence[str] | str, vocab_size: int, flag: str = "--data-path") -> None:
    """ValueError naming the dataset when a token id anywhere in ``--data-path`` lies outside ``[0, vocab_size)``.

    One pass over each ``.bin`` (memory-mapped); none when the token dtype cannot hold a bad id.
    """
    for _, prefix in parse_data_path(data_path):
        dataset = IndexedDataset(prefix)
        if dataset.num_tokens == 0:
            continue
        dtype = np.dtype(dataset.dtype)
        if dtype.kind == "u" and np.iinfo(dtype).max < vocab_size:
            continue
        low, high = dataset.token_range()
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"{flag} {prefix}: token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
                "(data tokenized for another model?)"
            )
