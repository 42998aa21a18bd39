"""Deadlines of many connections on few event-loop timers.

An idle server connection needs one wake-up at a time (its heartbeat or handshake
deadline). One ``TimerHandle`` each cost ~540 bytes per connection, the largest Python
object an idle connection kept. Here deadlines are rounded up to a slot of ``resolution``
seconds and the connections due in a slot share one loop timer: with 10,000 connections
on a 10 s heartbeat and 0.1 s slots, at most ~100 timers are armed at once.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

__all__ = ["TimerWheel", "Wakeable"]


class Wakeable(Protocol):
    def on_timer(self) -> None:
        """The deadline this was scheduled for has come (up to one slot late)."""


class TimerWheel:
    __slots__ = ("_handles", "_loop", "_slots", "resolution")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self._loop = loop
        self.resolution = resolution
        # Insertion-ordered dicts as sets: entries wake in the order they were scheduled.
        self._slots: dict[int, dict[Wakeable, None]] = {}
        self._handles: dict[int, asyncio.TimerHandle] = {}

    def schedule(self, when: float, entry: Wakeable) -> int:
        """Wake ``entry`` at ``when`` or up to one slot later; returns the slot to cancel."""
        resolution = self.resolution
        slot = math.ceil(when / resolution)
        if slot * resolution <= self._loop.time():
            # Due already: the next slot, never the one firing now, so that an entry which
            # reschedules itself from on_timer() cannot keep a slot firing forever.
            slot = math.floor(self._loop.time() / resolution) + 1
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = {}
            self._handles[slot] = self._loop.call_at(slot * resolution, self._fire, slot)
        entries[entry] = None
        return slot

    def reschedule(self, slot: int | None, when: float, entry: Wakeable) -> int:
        """Move ``entry``, scheduled in ``slot`` (None: nowhere), to ``when``; returns its slot.

        A deadline that moved later keeps its slot: the entry wakes early, finds nothing due
        and schedules itself again. That is one wake-up more for an entry that lives that
        long, and nothing at all for one gone before (most connections end long before
        their handshake deadline, which their heartbeat's replaces).
        """
        if slot is not None:
            entries = self._slots.get(slot)
            if entries is not None and entry in entries:
                if slot <= math.ceil(when / self.resolution):  # no later than when's own
                    return slot
                self.cancel(slot, entry)
        return self.schedule(when, entry)

    def cancel(self, slot: int, entry: Wakeable) -> None:
        entries = self._slots.get(slot)
        if entries is None or entry not in entries:
            return
        del entries[entry]
        if not entries and slot in self._handles:  # not the slot firing now
            del self._slots[slot]
            self._handles.pop(slot).cancel()

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._slots.values())

    def _fire(self, slot: int) -> None:
        del self._handles[slot]
        entries = self._slots[slot]
        # Left in place while firing, so that an entry cancelled meanwhile is not woken.
        while entries:
            entry = next(iter(entries))
            del entries[entry]
            try:
                entry.on_timer()
            except Exception as exc:  # a bug in one entry must not strand the others
                self._loop.call_exception_handler(
                    {"message": "timer wheel entry failed", "exception": exc}
                )
        del self._slots[slot]
