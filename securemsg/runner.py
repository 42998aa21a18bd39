"""Run a coroutine on the fastest event loop available: uvloop when installed, else asyncio.

Set ``SECUREMSG_NO_UVLOOP=1`` to force the standard loop (for comparison, or to debug).

The end is bounded. ``asyncio.run`` cancels the tasks still running when the coroutine
returns and waits for every one of them to end, for as long as that takes; a task that
swallows its cancellation (a library's reconnect or drain loop, say) then keeps a stopped
process alive for good. Here they get :data:`EXIT_GRACE` seconds, cancelled again each
tenth of a second; what is still running after that is logged (``tasks_abandoned``) and left
behind with the loop, and the process goes on to exit.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

import structlog

__all__ = ["EXIT_GRACE", "loop_factory", "loop_name", "run"]

T = TypeVar("T")

#: Seconds the tasks left when the main coroutine ends get to finish once cancelled.
EXIT_GRACE: Final = 5.0
_RECANCEL_EVERY: Final = 0.1

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


def run(main: Coroutine[Any, Any, T], *, grace: float = EXIT_GRACE) -> T:
    """``asyncio.run(main)`` on :func:`loop_factory`'s loop, with a bounded end (see the
    module doc): at most ``grace`` seconds for the tasks ``main`` left running."""
    runner = asyncio.Runner(loop_factory=loop_factory())
    try:
        return runner.run(main)
    finally:
        loop = runner.get_loop()
        left = _cancel_left_tasks(loop, grace)
        if not left:
            runner.close()  # nothing left to wait for: async generators, the executor
        else:
            logger.warning("tasks_abandoned", count=len(left), tasks=sorted(left)[:10])
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_left_tasks(loop: asyncio.AbstractEventLoop, grace: float) -> list[str]:
    """Cancel what still runs on ``loop``, again and again, for up to ``grace`` seconds; the
    names of the tasks that did not end."""
    deadline = time.monotonic() + grace
    while True:
        tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not tasks:
            return []
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return [getattr(task.get_coro(), "__qualname__", task.get_name()) for task in tasks]
        for task in tasks:
            task.cancel()
        wait = asyncio.wait(tasks, timeout=min(_RECANCEL_EVERY, remaining))
        loop.run_until_complete(wait)
