"""Fair under floods (issue 11): one connection that sends 200,000 tiny frames must not hold
the server's event loop from everyone else. The server runs in its own process (on the loop
the CLI picks), the flood comes from a thread with a blocking TLS socket, and a bystander in
the test's loop pings the server every 2 ms on a fixed schedule, so that a stall delays
every ping sent during it (a ping sent only after the last pong would see one stall once).

Before the fix a read of up to 256 KiB (thousands of frames) was carried out in one
callback: 200,000 publishes to an empty room delayed one ping by 561 ms, 200,000 joins and
leaves by 5,151 ms.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.core.messages import Hello, Ping, Pong, decode_server, encode, encode_frame_of
from securemsg.tls.contexts import client_context
from tests.faults import ServerProcess, paused_gc, record_figure

pytestmark = [pytest.mark.timeout(120), pytest.mark.serial]

FLOODS = {
    "publish": lambda n: b'{"type":"publish","room":"empty","body":%d}' % n,
    # Joins and leaves of 500 rooms: each is carried out (and logged), none refused.
    "join_leave": lambda n: (
        b'{"type":"%s","room":"r%d"}' % (b"leave" if n % 2 else b"join", n // 2 % 500)
    ),
}


@pytest.fixture
def server(tls_files: Any) -> Iterator[ServerProcess]:
    process = ServerProcess(
        ["--cert", str(tls_files.server_cert), "--key", str(tls_files.server_key)]
    )
    process.start()
    yield process
    process.kill()


def tls_connection(port: int, ctx: ssl.SSLContext, name: str) -> ssl.SSLSocket:
    """A blocking TLS connection that has been welcomed."""
    sock = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    )
    sock.sendall(encode_frame_of(Hello(version=2, name=name)))
    decoder = FrameDecoder(1 << 24)
    while not decoder.feed(sock.recv(65536)):
        pass
    return sock


class Pinger:
    """Pings the server every ``period`` seconds and times each pong."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.sent: dict[int, float] = {}
        self.delays: list[float] = []
        self.all_answered = asyncio.Event()

    async def run(self, period: float, stop: threading.Event) -> None:
        receiving = asyncio.create_task(self._receive())
        loop = asyncio.get_running_loop()
        try:
            next_id = 1
            while not stop.is_set() or len(self.sent) < 50:
                self.sent[next_id] = loop.time()
                self.writer.write(encode_frame_of(Ping(id=next_id)))
                next_id += 1
                await asyncio.sleep(period)
            if len(self.delays) < len(self.sent):
                self.all_answered.clear()  # set when all pongs are in (it may have been before)
                async with asyncio.timeout(30):
                    await self.all_answered.wait()
        finally:
            receiving.cancel()

    async def _receive(self) -> None:
        decoder = FrameDecoder(1 << 24)
        loop = asyncio.get_running_loop()
        while data := await self.reader.read(65536):
            for payload in decoder.feed(data):
                message = decode_server(payload)
                if isinstance(message, Pong) and message.id in self.sent:
                    self.delays.append(loop.time() - self.sent[message.id])
                    if len(self.delays) == len(self.sent):
                        self.all_answered.set()
                elif isinstance(message, Ping):
                    self.writer.write(encode_frame_of(Pong(id=message.id)))


@pytest.mark.parametrize("kind", FLOODS)
async def test_a_flood_of_tiny_frames_delays_a_bystanders_ping_little(
    server: ServerProcess, tls_files: Any, unit: float, kind: str
) -> None:
    count = 200_000
    blob = b"".join(encode_frame(FLOODS[kind](n)) for n in range(count))
    ctx = client_context(ca=tls_files.ca_pem)
    flooder = await asyncio.to_thread(tls_connection, server.port, ctx, "flooder")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(encode_frame(encode(Hello(version=2, name="bystander"))))
    await reader.read(65536)  # the welcome
    pinger = Pinger(reader, writer)
    done = threading.Event()

    def flood() -> None:
        try:
            flooder.sendall(blob)
            # The server has carried out the flood once it answers a ping sent after it.
            flooder.sendall(encode_frame_of(Ping(id=1)))
            decoder = FrameDecoder(1 << 24)
            while not any(
                isinstance(m, Pong) for m in map(decode_server, decoder.feed(flooder.recv(65536)))
            ):
                pass
        finally:
            done.set()

    with paused_gc():  # the pings time the server's stalls, not pytest's collections
        started = time.perf_counter()
        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        await pinger.run(0.002, done)
        elapsed = time.perf_counter() - started
    await asyncio.to_thread(thread.join, 30)
    flooder.close()
    writer.close()
    delays = sorted(pinger.delays)
    p95 = delays[int(0.95 * (len(delays) - 1))]
    p99 = delays[int(0.99 * (len(delays) - 1))]
    record_figure(
        f"flood of {count} tiny frames ({kind}): a bystander's ping",
        flood_s=round(elapsed, 3),
        pings=len(delays),
        p50_ms=round(delays[len(delays) // 2] * 1e3, 2),
        p95_ms=round(p95 * 1e3, 2),
        p99_ms=round(p99 * 1e3, 2),
        max_ms=round(delays[-1] * 1e3, 2),
    )
    # 50 ms unless the timescale is stretched. p95, not p99: on a shared 2-core VM one pause
    # of the whole guest (tens of ms stolen, seen as 33-45 % steal under load) delays every
    # ping of its span, ~30 of these ~1,000, which is 3 % of them and not the server's doing;
    # a server that carries out a whole read in one callback delays nearly every ping
    # (before issue 11: one stall of 561 ms, or 5,151 ms for joins and leaves).
    assert p95 < 0.5 * unit, f"p95 {p95 * 1e3:.1f} ms"
    assert delays[-1] < 10 * unit, f"max {delays[-1] * 1e3:.1f} ms"  # no one long stall
