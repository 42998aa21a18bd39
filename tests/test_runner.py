"""The end of ``securemsg.runner.run`` is bounded: the tasks a program leaves running are
cancelled, and one that will not end does not keep the process alive."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from securemsg.runner import run


def test_a_task_that_swallows_its_cancellation_is_left_behind_and_logged() -> None:
    cancels = 0
    held: list[asyncio.Task[None]] = []

    async def stubborn() -> None:
        nonlocal cancels
        while True:  # as a library's loop that catches CancelledError and goes on
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1

    async def main() -> str:
        held.append(asyncio.get_running_loop().create_task(stubborn()))
        await asyncio.sleep(0)
        return "done"

    with capture_logs() as logs:
        assert run(main(), grace=1.5) == "done"
    assert cancels >= 2, "cancelled again while the grace lasts"
    abandoned = [entry for entry in logs if entry["event"] == "tasks_abandoned"]
    assert len(abandoned) == 1 and abandoned[0]["count"] == 1, logs
    assert abandoned[0]["tasks"][0].endswith("stubborn")
    assert held[0].get_loop().is_closed()
    held[0].get_coro().close()  # what the garbage collector would do with it
    held[0]._log_destroy_pending = False  # type: ignore[attr-defined]  # logged above


def test_tasks_that_end_when_cancelled_end_before_the_loop_closes() -> None:
    ended: list[str] = []

    async def worker() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.05)  # a little cleanup after the cancel
            ended.append("worker")

    async def main() -> None:
        asyncio.get_running_loop().create_task(worker())
        await asyncio.sleep(0)

    with capture_logs() as logs:
        run(main(), grace=5.0)
    assert ended == ["worker"]
    assert not [entry for entry in logs if entry["event"] == "tasks_abandoned"]
