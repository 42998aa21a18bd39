"""The client's wait bound: ``Deadline`` turns asyncio's timeout into securemsg's, naming
the wait, and stays out of the way of everything else."""

from __future__ import annotations

import asyncio
import builtins

import pytest

from securemsg.client.mailbox import Deadline
from securemsg.errors import TimeoutError


async def test_an_expired_wait_raises_securemsg_timeout_naming_it() -> None:
    with pytest.raises(TimeoutError, match=r"^receive did not complete within 0\.05 s$") as caught:
        async with Deadline(0.05, "receive"):
            await asyncio.sleep(5)
    assert isinstance(caught.value.__cause__, builtins.TimeoutError)


async def test_a_wait_that_ends_in_time_cancels_its_timer() -> None:
    async with Deadline(0.05, "receive"):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # a timer left armed would cancel this task here


async def test_no_timeout_arms_nothing_and_lets_errors_through() -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(builtins.TimeoutError, match="not ours"):
        async with Deadline(None, "receive"):
            raise builtins.TimeoutError("not ours")
    with pytest.raises(builtins.TimeoutError, match="not ours either"):
        async with Deadline(5.0, "receive"):
            raise builtins.TimeoutError("not ours either")  # raised inside, not expired
    assert task.cancelling() == 0


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    async def wait() -> None:
        async with Deadline(5.0, "request to 'x'"):
            await asyncio.sleep(5)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
