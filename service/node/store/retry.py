"""How long to wait before sending an output again: exponential backoff with full jitter."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, *, base: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 = first retry): exponential, full jitter, capped.

    The cap is ``min(maximum, base * 2**attempt)`` and the delay is uniform in ``[0, cap]`` ("full
    jitter"), so many senders failing together do not retry in lockstep. A seeded ``rng`` makes
    it deterministic.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"attempt must be an integer >= 0, got {attempt!r}")
    if not base > 0:
        raise ValueError(f"base must be > 0 seconds, got {base!r}")
    if not maximum >= base:
        raise ValueError(f"maximum must be >= base ({base!r}), got {maximum!r}")
    # 2.0 ** 1000 is still finite; beyond it the cap is the maximum anyway.
    cap = min(maximum, base * 2.0 ** min(attempt, 1000))
    return rng.uniform(0.0, cap)
