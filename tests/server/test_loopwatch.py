"""The loop-stall detector on a real event loop: a deliberate stall is seen, a quiet loop not."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from securemsg.server.loopwatch import LAG_BUCKETS, LoopWatch


async def test_a_blocked_loop_is_logged_as_loop_stalled_with_its_duration() -> None:
    watch = LoopWatch(asyncio.get_running_loop(), threshold=0.1, interval=0.01)
    with capture_logs() as logs:
        watch.start()
        try:
            await asyncio.sleep(0.03)
            time.sleep(0.3)  # noqa: ASYNC251 - the deliberate stall: nothing else runs
            await asyncio.sleep(0.03)
        finally:
            watch.stop()
    stalls = [entry for entry in logs if entry["event"] == "loop_stalled"]
    assert len(stalls) == 1
    # The timer came due at most `interval` after the stall began, so it was late by at
    # least the stall less the interval.
    assert stalls[0]["duration"] >= 0.3 - 0.01 - 0.005
    assert stalls[0]["threshold"] == 0.1
    assert watch.stalls == 1
    # The lag went into the histogram's bucket of 0.25 to 0.5 s.
    assert watch.bucket_counts[LAG_BUCKETS.index(0.5)] >= 1


async def test_a_loop_that_only_awaits_stays_quiet_and_feeds_the_histogram() -> None:
    watch = LoopWatch(asyncio.get_running_loop(), threshold=0.5)
    with capture_logs() as logs:
        watch.start()
        try:
            for _ in range(30):
                await asyncio.sleep(0.01)
        finally:
            watch.stop()
    assert [entry for entry in logs if entry["event"] == "loop_stalled"] == []
    assert watch.count >= 1
    assert sum(watch.bucket_counts) == watch.count


async def test_threshold_zero_measures_but_never_logs() -> None:
    watch = LoopWatch(asyncio.get_running_loop(), threshold=0.0, interval=0.01)
    with capture_logs() as logs:
        watch.observe(10.0)
    assert logs == []
    assert watch.bucket_counts[-1] == 1  # +Inf
