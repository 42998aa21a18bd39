"""Run a coroutine on the fastest event loop available: uvloop when installed, else asyncio.

Set ``SECUREMSG_NO_UVLOOP=1`` to force the standard loop (for comparison, or to debug).

The end is bounded. ``asyncio.run`` cancels the tasks still running when the coroutine
returns and waits for every one of them to end, for as long as that takes; a task that
swallows its cancellation then keeps a stopped process alive for good. nats-py has such
paths (``except CancelledError: pass`` in ``drain()``, and in ``flush()`` while it queues the
PING): a loop of ours that awaits one and then waits again takes the cancel, goes back to
waiting, and ends only at a second cancel. (A cluster node, its NATS gone as it stopped,
logged ``server_stopped`` and then sat 20 minutes in ``asyncio.Runner``'s cancel of the
tasks left; which task it was could not be found.) Here they get :data:`CANCEL_GRACE` seconds,
cancelled again each second (:func:`cancel_and_wait`, which the server's parts
use for their own tasks too); what still runs after that is logged (``tasks_abandoned``) and
left behind with the loop, and the process goes on to exit.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar

import structlog

__all__ = ["CANCEL_GRACE", "cancel_and_wait", "loop_factory", "loop_name", "run"]

T = TypeVar("T")

#: Seconds cancelled tasks get to end (the tasks left when a program's main coroutine ends,
#: a server part's tasks when it closes).
CANCEL_GRACE: Final = 5.0
#: A cancelled task gets this long for its clean-up (a ``finally`` that unsubscribes, say)
#: before it is cancelled again.
_RECANCEL_EVERY: Final = 1.0

logger = structlog.get_logger("securemsg.runner")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if os.environ.get("SECUREMSG_NO_UVLOOP", "") not in ("", "0"):
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def loop_name() -> str:
    return "uvloop" if loop_factory() is not asyncio.new_event_loop else "asyncio"


def run(main: Coroutine[Any, Any, T], *, grace: float = CANCEL_GRACE) -> T:
    """``asyncio.run(main)`` on :func:`loop_factory`'s loop, with a bounded end (see the
    module doc): at most ``grace`` seconds for the tasks ``main`` left running."""
    runner = asyncio.Runner(loop_factory=loop_factory())
    try:
        return runner.run(main)
    finally:
        loop = runner.get_loop()
        if _cancel_left_tasks(loop, grace):
            runner.close()  # nothing left to wait for: async generators, the executor
        else:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_left_tasks(loop: asyncio.AbstractEventLoop, grace: float) -> bool:
    """Cancel what still runs on ``loop`` (and what that starts meanwhile) for up to
    ``grace`` seconds; True when all of it ended."""
    deadline = time.monotonic() + grace
    while True:
        tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not tasks:
            return True
        remaining = max(0.0, deadline - time.monotonic())
        if loop.run_until_complete(cancel_and_wait(tasks, remaining)):
            return False


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], grace: float = CANCEL_GRACE
) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait until they have ended, cancelling again every second (a task
    that swallowed a cancel gets another); the ones still running after ``grace`` seconds,
    logged as ``tasks_abandoned``, which the caller leaves behind."""
    pending = {task for task in tasks if not task.done()}
    deadline = time.monotonic() + grace
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_EVERY, remaining))
    if pending:
        names = sorted(getattr(t.get_coro(), "__qualname__", t.get_name()) for t in pending)
        logger.warning("tasks_abandoned", count=len(pending), tasks=names[:10])
    return list(pending)
