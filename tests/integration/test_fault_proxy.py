"""The fault proxy the chaos tests connect through leaves no socket open behind it: a socket
left open surfaces later as a ResourceWarning in whichever test the garbage collector runs
in, and fails that test."""

from __future__ import annotations

import asyncio

from tests.faults import FaultProxy


async def test_a_proxy_closed_while_a_client_connects_closes_both_sides() -> None:
    upstream_ended = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal upstream_ended
        await reader.read()  # until the proxy's side of this connection goes
        upstream_ended += 1
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rounds = 5
    try:
        for _ in range(rounds):
            proxy = FaultProxy(port)
            await proxy.__aenter__()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            await asyncio.sleep(0)  # the proxy's accept has begun its connect upstream
            await proxy.close()  # ... and the proxy closes before that connect is done
            await asyncio.sleep(0.05)
            assert not proxy.links, "a link made after close() is never closed"
            assert await asyncio.wait_for(reader.read(), 5) == b"", "the client side is closed"
            writer.close()
            await writer.wait_closed()
        for _ in range(100):
            if upstream_ended == rounds:
                break
            await asyncio.sleep(0.01)
        assert upstream_ended == rounds, "the upstream side is closed"
    finally:
        server.close()
        await server.wait_closed()
