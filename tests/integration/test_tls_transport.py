"""The server's TLS layer (securemsg.server.tlstransport) over real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from securemsg.server.server import Server
from securemsg.tls.contexts import client_context

from .conftest import RawClient, StartServer

OpenRaw = Callable[..., Awaitable[RawClient]]


def _server_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes held by allocations made under the server's code (clients excluded)."""
    server = snapshot.filter_traces(
        [tracemalloc.Filter(True, "*/securemsg/server/*", all_frames=True)]
    )
    return sum(stat.size for stat in server.statistics("filename"))


async def _open_idle(
    raw: OpenRaw, server: Server, count: int, ctx: Any, *, prefix: str
) -> list[RawClient]:
    return [await raw(server.port, f"{prefix}-{index}", ctx=ctx) for index in range(count)]


async def test_an_idle_connection_holds_no_read_buffer_of_its_own(
    start_server: StartServer, raw: OpenRaw, tls_files: Any
) -> None:
    # The loops' SSL transports keep a 256 KiB read buffer per connection (uvloop's
    # SSL_READ_MAX_SIZE, asyncio's bytearray): here the thread's one buffer serves them all.
    server = await start_server()
    ctx = client_context(ca=tls_files.ca_pem)
    warm = await _open_idle(
        raw, server, 2, ctx, prefix="warm"
    )  # warm up: the shared buffer, caches, first imports
    tracemalloc.start(40)
    try:
        before = _server_bytes(tracemalloc.take_snapshot())
        count = 10
        idle = await _open_idle(raw, server, count, ctx, prefix="idle")
        await asyncio.sleep(0.05)
        after = _server_bytes(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    assert len(server.connections) == len(warm) + len(idle)
    per_connection = (after - before) / count
    assert per_connection < 32 * 1024, f"{per_connection:.0f} bytes per idle connection"
