"""A server part's tasks end when it closes, even when a library swallowed the first cancel
(nats-py's ``drain()`` and ``flush()`` can), and a task that never ends does not hold the close."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from securemsg.server.tasks import Tasks


async def test_a_loop_whose_flush_swallowed_the_cancel_still_ends() -> None:
    wake = asyncio.Event()
    rounds = 0

    async def sender() -> None:  # a cluster node's note sender: wait, flush, wait again
        nonlocal rounds
        while True:
            await wake.wait()
            wake.clear()
            rounds += 1
            try:
                await asyncio.sleep(10)  # the flush...
            except asyncio.CancelledError:
                pass  # ... that takes the cancel, as nats-py's can

    tasks = Tasks()
    tasks.spawn(sender())
    wake.set()
    await asyncio.sleep(0.01)  # in its flush
    await asyncio.wait_for(tasks.cancel_all(), 5)
    assert len(tasks) == 0 and rounds == 1


async def test_a_task_that_never_ends_is_left_behind_and_logged() -> None:
    stop = False

    async def stubborn() -> None:
        while not stop:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    tasks = Tasks()
    tasks.spawn(stubborn())
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await asyncio.wait_for(tasks.cancel_all(grace=0.3), 5)
    abandoned = [entry for entry in logs if entry["event"] == "tasks_abandoned"]
    assert len(abandoned) == 1 and abandoned[0]["tasks"][0].endswith("stubborn"), logs
    assert len(tasks) == 1
    stop = True  # let it go, so the test's loop can close
    await asyncio.wait_for(tasks.cancel_all(), 5)
    assert len(tasks) == 0
