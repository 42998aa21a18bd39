"""Reconnect delays: exponential, capped, fully jittered, reproducible with a seed."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from securemsg.core.backoff import backoff_delays


def take(count: int, **kwargs: object) -> list[float]:
    return list(itertools.islice(backoff_delays(**kwargs), count))  # type: ignore[arg-type]


def test_each_delay_is_within_zero_and_the_capped_exponential() -> None:
    base, cap = 0.5, 30.0
    delays = take(200, base=base, cap=cap, rng=random.Random(1))
    for attempt, delay in enumerate(delays):
        assert 0.0 <= delay <= min(cap, base * 2**attempt)


def test_delays_grow_on_average_until_the_cap() -> None:
    runs = [take(8, base=1.0, cap=1000.0, rng=random.Random(seed)) for seed in range(200)]
    means = [sum(run[attempt] for run in runs) / len(runs) for attempt in range(8)]
    for attempt in range(7):
        assert means[attempt + 1] > means[attempt]
    for attempt, mean in enumerate(means):
        assert mean == pytest.approx(2**attempt / 2, rel=0.25)  # uniform(0, x) averages x/2


def test_delays_never_exceed_the_cap_even_after_many_attempts() -> None:
    delays = take(2000, base=0.1, cap=2.0, rng=random.Random(2))
    assert max(delays) <= 2.0
    assert all(math.isfinite(delay) for delay in delays)
    assert max(delays[-100:]) > 1.0  # the cap is reached, not only approached


def test_the_same_seed_gives_the_same_delays() -> None:
    assert take(20, rng=random.Random(7)) == take(20, rng=random.Random(7))


def test_differently_seeded_generators_differ() -> None:
    assert take(20, rng=random.Random(1)) != take(20, rng=random.Random(2))


def test_without_a_rng_the_delays_still_respect_the_bounds() -> None:
    for attempt, delay in enumerate(take(10, base=0.5, cap=4.0)):
        assert 0.0 <= delay <= min(4.0, 0.5 * 2**attempt)


@pytest.mark.parametrize(
    ("base", "cap"),
    [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (math.nan, 1.0), (0.5, math.nan)],
)
def test_invalid_arguments_raise_at_the_call(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        backoff_delays(base=base, cap=cap)
