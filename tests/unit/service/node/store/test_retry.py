"""Retry backoff: exponential, capped, full jitter, deterministic with a seeded generator."""

from __future__ import annotations

import random

import pytest

from service.node.store.retry import backoff_delay


def test_backoff_grows_exponentially_up_to_the_maximum_with_full_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(60.0, 1.0 * 2**attempt)
        delays = [backoff_delay(attempt, base=1.0, maximum=60.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap  # spread over the whole [0, cap]
    assert backoff_delay(10_000, base=1.0, maximum=60.0, rng=rng) <= 60.0
    assert [backoff_delay(3, base=0.5, maximum=30.0, rng=random.Random(1)) for _ in range(2)] == [
        backoff_delay(3, base=0.5, maximum=30.0, rng=random.Random(1))
    ] * 2
    with pytest.raises(ValueError, match="-1"):
        backoff_delay(-1, base=1.0, maximum=60.0, rng=rng)
    with pytest.raises(ValueError, match="0.5"):
        backoff_delay(1, base=1.0, maximum=0.5, rng=rng)
