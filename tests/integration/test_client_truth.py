"""What the client tells its user is what happened: a watcher nobody holds still sees the
gap, a reconnect reuses the TLS context, and the server answers a ping pipelined with hello."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from securemsg.client.types import Reconnected, StateChange
from securemsg.core.messages import Hello, Ping, Pong, Welcome
from tests.integration.conftest import OpenClient, StartServer


async def test_a_state_watcher_nobody_holds_is_not_collected_and_sees_the_gap(
    start_server: StartServer, open_client: OpenClient, unit: float
) -> None:
    server = await start_server()
    port = server.port
    alice = await open_client(port, "alice")
    seen: list[StateChange] = []

    async def watch() -> None:
        async for change in alice.state_changes():
            seen.append(change)

    # Deliberately not kept: asyncio holds tasks weakly, so only the stream can hold it.
    asyncio.get_running_loop().create_task(watch())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gc.collect()
    await server.close()
    await start_server(port=port)
    for _ in range(400):
        if any(type(change) is Reconnected for change in seen):
            break
        await asyncio.sleep(unit / 10)
    assert Reconnected(resumed=False, gap=None) in seen, seen


async def test_a_reconnect_reuses_the_tls_context_of_the_first_connect(
    start_server: StartServer, open_client: OpenClient, unit: float
) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    first = alice._mailbox.conn
    assert first is not None and first.transport is not None
    context = first.transport.get_extra_info("sslcontext")
    assert context is not None
    changes = alice.state_changes()
    first.abort("test")
    async with asyncio.timeout(50 * unit):
        async for change in changes:
            if type(change) is Reconnected:
                break
    second = alice._mailbox.conn
    assert second is not None and second is not first and second.transport is not None
    assert second.transport.get_extra_info("sslcontext") is context


async def test_a_ping_pipelined_with_hello_is_answered(start_server: StartServer, raw: Any) -> None:
    server = await start_server()
    client = await raw(server.port)
    client.send(Hello(version=2, name="alice"), Ping(id=42))  # one write, one read
    assert type(await client.recv()) is Welcome
    assert await client.recv_type(Pong, timeout=2) == Pong(id=42)
