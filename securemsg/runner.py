"""Run a coroutine on the fastest event loop available: uvloop when installed, else asyncio.

Set ``SECUREMSG_NO_UVLOOP=1`` to force the standard loop (for comparison, or to debug).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "loop_name", "run"]

T = TypeVar("T")


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


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
