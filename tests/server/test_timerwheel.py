"""The timer wheel on a real event loop, with short times and generous bounds."""

from __future__ import annotations

import asyncio

import pytest

from securemsg.server.timerwheel import TimerWheel

pytestmark = pytest.mark.timeout(10)


class Entry:
    def __init__(self, name: str, log: list[tuple[str, float]], wheel: TimerWheel) -> None:
        self.name, self.log, self.wheel = name, log, wheel
        self.again: float | None = None

    def on_timer(self) -> None:
        self.log.append((self.name, asyncio.get_running_loop().time()))
        if self.again is not None:
            when, self.again = self.again, None
            self.wheel.schedule(asyncio.get_running_loop().time() + when, self)


async def test_entries_wake_at_their_deadline_rounded_up_to_a_slot_and_share_timers() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, 0.02)
    log: list[tuple[str, float]] = []
    start = loop.time()
    entries = {name: Entry(name, log, wheel) for name in "abcd"}
    slot_a = wheel.schedule(start + 0.05, entries["a"])
    slot_b = wheel.schedule(start + 0.051, entries["b"])  # same slot as a, most likely
    wheel.schedule(start + 0.15, entries["c"])
    slot_d = wheel.schedule(start + 0.10, entries["d"])
    assert len(wheel) == 4 and len(wheel._handles) <= 4
    wheel.cancel(slot_d, entries["d"])
    wheel.cancel(slot_d, entries["d"])  # twice is harmless
    await asyncio.sleep(0.3)
    names = [name for name, _ in log]
    assert names == ["a", "b", "c"], "d was cancelled; the others in deadline order"
    for name, woke in log:
        deadline = {"a": 0.05, "b": 0.051, "c": 0.15}[name]
        assert deadline - 0.001 <= woke - start <= deadline + 0.02 + 0.1, (name, woke - start)
    assert len(wheel) == 0 and not wheel._handles and not wheel._slots
    assert slot_a <= slot_b


async def test_an_entry_due_already_or_rescheduling_itself_waits_for_a_later_slot() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, 0.01)
    log: list[tuple[str, float]] = []
    entry = Entry("x", log, wheel)
    entry.again = 0.0  # from on_timer: "due now" again, which must not spin in one slot
    wheel.schedule(loop.time() - 1.0, entry)  # in the past: the next slot
    await asyncio.sleep(0.2)
    assert [name for name, _ in log] == ["x", "x"]
    assert log[1][1] > log[0][1]


async def test_cancelling_one_entry_keeps_the_others_of_its_slot() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, 0.05)
    log: list[tuple[str, float]] = []
    a, b = Entry("a", log, wheel), Entry("b", log, wheel)
    when = loop.time() + 0.06
    slot = wheel.schedule(when, a)
    assert wheel.schedule(when, b) == slot
    wheel.cancel(slot, a)
    await asyncio.sleep(0.25)
    assert [name for name, _ in log] == ["b"]


async def test_a_deadline_moved_later_keeps_its_slot_and_one_moved_earlier_moves() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, 0.02)
    log: list[tuple[str, float]] = []
    early, late = Entry("early", log, wheel), Entry("late", log, wheel)
    start = loop.time()
    slot = wheel.schedule(start + 0.1, late)
    assert wheel.reschedule(slot, start + 5.0, late) == slot  # later: kept, wakes early
    assert wheel.reschedule(slot, start + 0.1 + 0.001, late) == slot  # later in the same slot
    moved = wheel.schedule(start + 5.0, early)
    assert wheel.reschedule(moved, start + 0.05, early) != moved  # earlier: moved
    assert wheel.reschedule(None, start + 0.2, Entry("new", log, wheel)) > 0
    assert len(wheel) == 3
    await asyncio.sleep(0.4)
    assert [name for name, _ in log] == ["early", "late", "new"]
    assert len(wheel) == 0  # nothing left at 5 s: the early entry's old slot was given back


async def test_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimerWheel(asyncio.get_running_loop(), 0)
