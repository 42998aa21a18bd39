"""The event-loop stall detector: how late the loop runs a callback that it was told to run.

Theory of operation: a callback is scheduled ``interval`` seconds ahead with ``call_at``;
when it runs, ``now - due`` is the loop's lag, the time the loop spent on something else
(a blocking call, a long computation, a burst of callbacks). Each lag is counted in a small
fixed-bucket histogram (read by the metrics collector at scrape time, so this module needs
no Prometheus) and a lag at or past ``threshold`` is logged once as ``loop_stalled`` with its
``duration``. The duration is a lower bound of the stall: a stall that began just after a
check is seen up to ``interval`` later. The cost is one timer callback per ``interval``.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Final

import structlog

__all__ = ["LAG_BUCKETS", "LoopWatch"]

logger = structlog.get_logger("securemsg.server.loopwatch")

#: Upper bounds of the lag histogram's buckets, in seconds (the last bucket is +Inf).
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: The longest time between two checks: short enough to see stalls of a tenth of a second.
MAX_INTERVAL: Final = 0.1


class LoopWatch:
    """Measures the lag of ``loop`` every ``interval`` seconds; logs stalls past ``threshold``.

    ``threshold`` 0 keeps the histogram but never logs.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        threshold: float,
        interval: float | None = None,
    ) -> None:
        self.loop = loop
        self.threshold = threshold
        if interval is None:
            interval = min(MAX_INTERVAL, threshold / 2) if threshold > 0 else MAX_INTERVAL
        self.interval = interval
        #: Observations per bucket of :data:`LAG_BUCKETS`, and one more for +Inf.
        self.bucket_counts = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        self.count = 0
        self.stalls = 0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        if self._handle is None:
            self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        self._due = self.loop.time() + self.interval
        self._handle = self.loop.call_at(self._due, self._check)

    def _check(self) -> None:
        lag = max(0.0, self.loop.time() - self._due)
        self.observe(lag)
        self._schedule()

    def observe(self, lag: float) -> None:
        self.bucket_counts[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        self.lag_sum += lag
        self.count += 1
        if self.threshold > 0 and lag >= self.threshold:
            self.stalls += 1
            logger.warning("loop_stalled", duration=round(lag, 3), threshold=self.threshold)
