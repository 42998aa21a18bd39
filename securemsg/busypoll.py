"""Busy polling: after a message, the loop keeps polling instead of sleeping, for a moment.

A request and its reply cross the server twice, and reach a client process once each. Each
time, the process has gone to sleep in ``epoll_wait`` and must be woken by the kernel (and, on
a virtual machine, its vCPU by the hypervisor): most of a round trip through an idle server
is those wake-ups, not work. The server and the client both spin (``busy_poll_us`` of each).
Go's scheduler, and so nats-server, spins a little before it sleeps; Linux offers the same
for sockets as ``SO_BUSY_POLL``, which does nothing on loopback. This is that spin at the
event loop's level: for a window after each message, a callback keeps the loop polling with
a zero timeout, so the next message is picked up without a wake-up.

What it costs is bounded: at most the longest window (``busy_poll_us``) of spinning per
message, and only while messages keep coming within that of each other; wider spacing (a
paced publisher, heartbeats, a quiet server) closes the window, so it costs nothing there,
and a server busy all the time runs the callback once per loop turn. Each turn of the spin
yields the CPU to any process waiting for it. Measured figures: ``docs/operations.md``
(``busy_poll_us``).
"""

from __future__ import annotations

import asyncio
import os
import time

from securemsg._compiled import mypyc_attr

__all__ = ["BusyPoll"]


# Compiled in the optional build (bench/compile.py); tests subclass it in Python.
@mypyc_attr(allow_interpreted_subclasses=True)
class BusyPoll:
    """Keeps ``loop`` polling after each :meth:`touch`, for up to ``longest`` seconds (0: off).

    The window adapts, as Linux KVM's halt polling does: it grows (to an eighth of
    ``longest``, then doubling) when the next message came within ``longest`` of the last
    one but after the spin had given up, and halves (then drops to 0) when it came later
    than that. A request/reply exchange keeps it open; messages spaced wider than
    ``longest`` (a paced publisher, heartbeats) close it, so they cost no spinning.
    """

    __slots__ = ("_active", "_deadline", "_last", "_longest", "_loop", "touched", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, longest: float) -> None:
        self._loop = loop
        self._longest = longest
        #: Seconds the loop polls after a message, now.
        self.window = 0.0
        self._active = False
        self._deadline = 0.0
        self._last = -longest  # when the last message came
        #: Set on every message; the spin sees it and moves its deadline.
        self.touched = False

    @property
    def active(self) -> bool:
        return self._active

    def touch(self) -> None:
        """A message came in: poll on for the window from now."""
        self.touched = True
        if self._active or not self._longest:
            return
        now = time.perf_counter()
        longest, window = self._longest, self.window
        if now - self._last <= longest:  # a longer spin would have caught it
            self.window = min(longest, max(window * 2, longest / 8))
        else:
            self.window = window / 2 if window > longest / 8 else 0.0
        self._last = now
        if self.window:
            self._active = True
            self.touched = False
            self._deadline = now + self.window
            self._loop.call_soon(self._spin)

    def _spin(self) -> None:
        # One call per loop turn: the loop polls with a zero timeout while a callback is
        # ready. The loop's own clock (a millisecond, cached per turn in uvloop) is too
        # coarse for a window of tens of microseconds.
        now = time.perf_counter()
        if self.touched:
            self.touched = False
            self._last = now
            self._deadline = now + self.window
        if now < self._deadline:
            # A process woken on this CPU (often the very client we just wrote to) must not
            # wait for the spin to end: the scheduler would let it wait milliseconds.
            os.sched_yield()
            self._loop.call_soon(self._spin)
        else:
            self._active = False
