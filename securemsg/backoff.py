"""Reconnect delays, sans-I/O: exponential backoff with full jitter.

delay(attempt) = uniform(0, min(cap, base * 2**attempt)). Full jitter spreads clients that
were cut off together, so they do not come back in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["backoff_delays"]

_MAX_EXPONENT = 62  # beyond this base * 2**n is past any sane cap; avoids float overflow


def backoff_delays(
    *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Yield an endless sequence of delays in seconds; pass a seeded ``rng`` in tests."""
    if base <= 0 or cap < base:
        raise ValueError("backoff needs 0 < base <= cap")
    uniform = (rng or random.Random()).uniform
    attempt = 0
    while True:
        yield uniform(0.0, min(cap, base * 2 ** min(attempt, _MAX_EXPONENT)))
        attempt += 1
