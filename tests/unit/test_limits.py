"""The token buckets behind the rate limit, on a clock the test moves."""

from __future__ import annotations

import pytest

import limits
from limits import TokenBuckets, batch_size


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(per_second=0.5, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(2.0)  # one token every 2 s
    assert buckets.take("b") == 0.0  # another client, another bucket
    clock.now += 1.0
    assert buckets.take("a") == pytest.approx(1.0)  # half a token so far
    clock.now += 1.0
    assert buckets.take("a") == 0.0
    clock.now += 60.0
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, no further


def test_a_cost_takes_that_many_tokens() -> None:
    clock = Clock()
    buckets = TokenBuckets(per_second=1.0, burst=10, clock=clock)
    assert buckets.take("a", cost=8) == 0.0
    assert buckets.take("a", cost=3) == pytest.approx(1.0)
    assert buckets.take("a", cost=2) == 0.0  # a refused request takes nothing


def test_the_least_recently_seen_clients_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_TRACKED_CLIENTS", 2)
    clock = Clock()
    buckets = TokenBuckets(per_second=0.001, burst=1, clock=clock)
    assert buckets.take("a") == 0.0 and buckets.take("b") == 0.0
    assert buckets.take("a") > 0  # "a" is now the most recent
    assert buckets.take("c") == 0.0  # "b" goes
    assert buckets.take("a") > 0 and buckets.take("b") == 0.0


def test_batch_size_reads_langserve_batches_only() -> None:
    assert batch_size(b'{"inputs": [1, 2, 3], "config": {}}') == 3
    assert batch_size(b'{"input": "x"}') is None
    assert batch_size(b"not json") is None
    assert batch_size(b"[1, 2]") is None
