"""Learning-rate schedules: warmup, then cosine / linear / constant / WSD down to min-lr."""

from __future__ import annotations

import math

import pytest

from megatron_subnet.training.schedules import LRSchedule


def test_warmup_then_cosine_reaches_min_lr():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=4, train_iters=104, style="cosine")
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    assert s(54) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(104) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    values = [s(i) for i in range(4, 105)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant():
    linear = LRSchedule(lr=2.0, min_lr=0.0, warmup_iters=0, train_iters=10, style="linear")
    assert [linear(i) for i in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    constant = LRSchedule(lr=3.0, min_lr=0.0, warmup_iters=2, train_iters=10, style="constant")
    assert [constant(i) for i in (0, 1, 5, 9)] == pytest.approx([1.5, 3.0, 3.0, 3.0])


def test_wsd_is_stable_then_decays_over_its_last_iterations():
    s = LRSchedule(lr=1.0, min_lr=0.2, warmup_iters=2, train_iters=20, style="wsd", wsd_decay_iters=4)
    assert [s(i) for i in range(2, 16)] == pytest.approx([1.0] * 14)
    assert [s(i) for i in range(16, 20)] == pytest.approx([0.8, 0.6, 0.4, 0.2])
