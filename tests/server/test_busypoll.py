"""The busy poll on a real event loop, with windows of tens of milliseconds and generous bounds.

Every loop here is bounded in turns: a callback that raises inside a spinning loop is only
logged by asyncio, so a test must not rely on pytest-timeout to end it.
"""

from __future__ import annotations

import asyncio

import pytest

from securemsg.busypoll import BusyPoll

pytestmark = [pytest.mark.timeout(10), pytest.mark.serial]

LONGEST = 0.1  # seconds: a loaded CI machine oversleeps by less than a spacing's slack
CLOSE = LONGEST * 0.6  # messages this far apart: within the longest spin, not half of it


class CountingPoll(BusyPoll):
    __slots__ = ("spins",)

    def __init__(self, loop: asyncio.AbstractEventLoop, longest: float) -> None:
        super().__init__(loop, longest)
        self.spins = 0

    def _spin(self) -> None:
        self.spins += 1
        super()._spin()


def new_poll(longest: float = LONGEST) -> CountingPoll:
    return CountingPoll(asyncio.get_running_loop(), longest)


async def open_window(poll: BusyPoll) -> list[float]:
    """Messages CLOSE apart until the window is the longest; the windows seen on the way."""
    windows = []
    for _ in range(8):
        poll.touch()
        windows.append(poll.window)
        if poll.window == pytest.approx(LONGEST):
            return windows
        await asyncio.sleep(CLOSE)
    raise AssertionError(f"the window did not open: {windows}")


async def test_a_lone_message_does_not_spin() -> None:
    poll = new_poll()
    poll.touch()
    assert poll.window == 0 and not poll.active


async def test_messages_a_spin_would_catch_open_the_window_step_by_step() -> None:
    # Each spin ends before the next message (window < CLOSE), which then comes within
    # LONGEST: a longer spin would have caught it, so the window doubles.
    windows = await open_window(new_poll())
    assert windows == pytest.approx([0, LONGEST / 8, LONGEST / 4, LONGEST / 2, LONGEST])


async def test_a_message_during_the_spin_extends_it_and_then_the_loop_sleeps() -> None:
    poll = new_poll()
    await open_window(poll)
    for _ in range(4):  # four spacings of CLOSE, over two windows, kept spinning by messages
        await asyncio.sleep(CLOSE)
        assert poll.active
        poll.touch()
    assert poll.window == pytest.approx(LONGEST)
    await asyncio.sleep(LONGEST * 2)
    assert not poll.active  # it ended by itself
    idle = poll.spins
    await asyncio.sleep(LONGEST)
    assert poll.spins == idle  # and nothing runs after it


async def test_while_it_spins_the_loop_turns_instead_of_sleeping() -> None:
    poll = new_poll()
    await open_window(poll)
    await asyncio.sleep(LONGEST * 2)
    before = poll.spins
    poll.touch()
    await asyncio.sleep(LONGEST * 2)
    # Without the spin the loop would sleep through the window in one turn; polling, it
    # comes round thousands of times (each turn yields the CPU to whoever needs it).
    assert poll.spins - before > 20


async def test_widely_spaced_messages_close_the_window_again() -> None:
    poll = new_poll()
    await open_window(poll)
    windows = []
    for _ in range(5):
        await asyncio.sleep(LONGEST * 2)  # later than the longest spin would have waited
        poll.touch()
        windows.append(poll.window)
    assert windows == pytest.approx([LONGEST / 2, LONGEST / 4, LONGEST / 8, 0, 0])
    await asyncio.sleep(LONGEST * 2)
    assert not poll.active


async def test_zero_is_off() -> None:
    poll = new_poll(0.0)
    for _ in range(5):
        poll.touch()
        await asyncio.sleep(0.001)
    assert poll.window == 0 and not poll.active and poll.spins == 0
