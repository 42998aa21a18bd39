"""Tasks a part of the server starts and does not await (a connection's opening, a cluster
node's heartbeat): held, since asyncio keeps only a weak reference to a running task; a
failure logged as ``task_failed``; all cancelled and awaited when that part closes, for a
bounded time (:func:`securemsg.runner.cancel_and_wait`: a library may swallow a cancel)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

from securemsg.runner import CANCEL_GRACE, cancel_and_wait

__all__ = ["Tasks"]

logger = structlog.get_logger("securemsg.server")


class Tasks:
    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)

    async def cancel_all(self, grace: float = CANCEL_GRACE) -> None:
        """Cancel every task and return once all have ended, or after ``grace`` seconds,
        leaving the rest (logged)."""
        await cancel_and_wait(list(self._tasks), grace)
