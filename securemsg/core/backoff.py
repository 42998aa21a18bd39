"""Reconnect delays, sans-I/O: exponential backoff with full jitter.

delay(attempt) = uniform(0, min(cap, base * 2**attempt)). Full jitter spreads clients that
were cut off together, so they do not come back in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["backoff_delays"]

_MAX_EXPONENT = 62  # beyond this base * 2**n is past any sane cap; avoids float overflow


def backoff_delays(
    *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
) -> Iterator[float]:
    """An endless sequence of delays in seconds; pass a seeded ``rng`` in tests.

    Bad arguments raise here, at the call, not at the first ``next()``.
    """
    if not 0 < base <= cap:  # also refuses NaN
        raise ValueError("backoff needs 0 < base <= cap")
    return _delays(base, cap, (rng or random.Random()).uniform)


def _delays(base: float, cap: float, uniform: Callable[[float, float], float]) -> Iterator[float]:
    attempt = 0
    while True:
        yield uniform(0.0, min(cap, base * 2 ** min(attempt, _MAX_EXPONENT)))
        attempt += 1
