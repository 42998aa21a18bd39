"""The server's TLS layer (securemsg.server.tlstransport) over real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl
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


class _RecordingTCP(asyncio.Transport):
    """The TCP side under a TLSTransport: keeps each write, so the test can count them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _App(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buffer = bytearray(65536)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        pass


async def test_the_last_words_and_the_close_notify_leave_in_one_tcp_write(
    tls_files: Any,
) -> None:
    # A bye (or a fatal error) and the close_notify after it: one system call and one
    # wake-up of the client, not two (see ServerConnection._flush(closing=True)).
    from securemsg.server.tlstransport import TLSTransport
    from securemsg.tls.contexts import server_context

    loop = asyncio.get_running_loop()
    layer = TLSTransport(
        loop, server_context(cert=tls_files.server_cert, key=tls_files.server_key), _App()
    )
    tcp = _RecordingTCP()
    handshaken: list[BaseException | None] = []
    layer.when_handshaken(handshaken.append)
    layer.connection_made(tcp)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(ca=tls_files.ca_pem).wrap_bio(
        incoming, outgoing, server_hostname="localhost"
    )

    def to_server() -> None:
        data = outgoing.read()
        buffer = layer.get_buffer(len(data))
        buffer[: len(data)] = data
        layer.buffer_updated(len(data))

    for _ in range(4):  # ClientHello, the server's flight, Finished
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            to_server()
            for write in tcp.writes:
                incoming.write(write)
            tcp.writes.clear()
    to_server()  # the client's Finished
    assert handshaken == [None]  # told from the read that ended the handshake
    tcp.writes.clear()

    layer.write_and_close(b"last words")

    assert len(tcp.writes) == 1
    incoming.write(tcp.writes[0])
    assert client.read(100) == b"last words"
    # b"" is the close_notify (nothing more to read would raise SSLWantReadError instead).
    assert client.read(100) == b""
