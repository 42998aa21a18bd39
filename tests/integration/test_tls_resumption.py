"""TLS 1.3 session resumption (``tls_session_tickets``) over real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from securemsg.server.server import Server
from securemsg.tls.contexts import client_context

from ..faults import ServerProcess
from .conftest import OpenClient, RawClient, StartServer


def _only_connection(server: Server) -> Any:
    (conn,) = server.connections
    return conn


async def _reconnected(server: Server, old: Any, timeout: float) -> Any:
    """The connection that replaced ``old`` once the client has come back."""
    async with asyncio.timeout(timeout):
        while True:
            conns = [c for c in server.connections if c is not old and c.session is not None]
            if conns:
                return conns[0]
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("tickets", [1, 0])
async def test_a_reconnecting_client_resumes_its_tls_session_when_the_server_sends_tickets(
    start_server: StartServer, open_client: OpenClient, unit: float, tickets: int
) -> None:
    server = await start_server(tls_session_tickets=tickets)
    client = await open_client(server.port, "alice")
    first = _only_connection(server)
    assert not first.transport.get_extra_info("ssl_object").session_reused
    first.transport.abort()  # the network dropped it: the client reconnects by itself
    second = await _reconnected(server, first, 50 * unit)
    assert second.transport.get_extra_info("ssl_object").session_reused is bool(tickets)
    await client.publish("room", "still works")
    await client.flush(20 * unit)


async def test_a_resumed_session_keeps_the_client_certificates_identity(
    start_server: StartServer, open_client: OpenClient, tls_files: Any, unit: float
) -> None:
    # A resumed TLS 1.3 handshake carries no certificate: the name must come from the
    # certificate of the full handshake, kept in the ticket, or anyone could claim any name.
    server = await start_server(
        ca=str(tls_files.ca_pem), require_client_cert=True, tls_session_tickets=1
    )
    client = await open_client(
        server.port, None, cert=str(tls_files.alice_cert), key=str(tls_files.alice_key)
    )
    first = _only_connection(server)
    first.transport.abort()
    second = await _reconnected(server, first, 50 * unit)
    assert second.transport.get_extra_info("ssl_object").session_reused
    assert second.identity == "alice"
    assert second.session.name == "alice"
    assert client.name == "alice"


@pytest.fixture
def ticket_server(tls_files: Any) -> Iterator[ServerProcess]:
    process = ServerProcess(
        [
            "--cert",
            str(tls_files.server_cert),
            "--key",
            str(tls_files.server_key),
            "--tls-session-tickets",
            "1",
        ]
    )
    process.start()
    yield process
    process.kill()


def _resumed_flags(process: ServerProcess) -> list[bool]:
    return [
        bool(event["tls_resumed"])
        for event in process.events()
        if event.get("event") == "connection_opened" and "tls_resumed" in event
    ]


async def _welcomed_and_closed(port: int, ctx: Any, name: str) -> None:
    client = await RawClient.open(port, ctx=ctx)
    try:
        welcome = await client.hello(name)
        assert type(welcome).__name__ == "Welcome"
        ctx.remember(client.writer.get_extra_info("ssl_object"), host="localhost")
    finally:
        await client.close()


async def _flags(process: ServerProcess, count: int, timeout: float) -> list[bool]:
    async with asyncio.timeout(timeout):
        while len(flags := _resumed_flags(process)) < count:  # noqa: ASYNC110 - a log file
            await asyncio.sleep(0.02)
    return flags


async def test_a_ticket_resumes_with_the_server_that_issued_it_not_with_a_fresh_process(
    ticket_server: ServerProcess, tls_files: Any, unit: float
) -> None:
    ctx = client_context(ca=tls_files.ca_pem)
    await _welcomed_and_closed(ticket_server.port, ctx, "alice")
    await _welcomed_and_closed(ticket_server.port, ctx, "alice")
    assert await _flags(ticket_server, 2, 20 * unit) == [False, True]
    # The ticket key lives in the server's SSL context, which a new process makes anew.
    await asyncio.to_thread(ticket_server.restart)
    await _welcomed_and_closed(ticket_server.port, ctx, "alice")  # a full handshake, and works
    assert await _flags(ticket_server, 1, 20 * unit) == [False]
