"""CPU per message of the hot paths, without sockets or TLS: python bench/micro.py

- server route: a ``publish`` frame in, decoded, routed to one subscriber, the ``message``
  frame and the publisher's (batched) ``ack`` written (fake transports);
- client publish: ``await client.publish(room, body)`` up to the write, and its ack back;
- client receive: ``message`` frames in (as one read), out of ``await client.receive()``,
  with the cumulative ack written.

These are the numbers behind the fast-path changes (see docs/benchmarks.md): the TLS and
socket costs come on top, and ``securemsg bench`` measures the whole.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

from securemsg.client.client import Client
from securemsg.client.connection import ClientConnection
from securemsg.config import ClientConfig, ServerConfig
from securemsg.core.frames import encode_frame
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Delivery,
    Heartbeat,
    Hello,
    Join,
    Publish,
    ServerAck,
    Welcome,
    batch_frame,
    encode,
    encode_body,
)
from securemsg.server.connection import ServerConnection
from securemsg.server.server import Server

BATCH = 64  # frames per read, about what a busy TLS connection delivers at once


class FakeTransport:
    def __init__(self) -> None:
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.writes += 1

    def writelines(self, data: list[bytes]) -> None:
        for item in data:
            self.write(item)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _frames(messages: list[Any]) -> bytes:
    return b"".join(encode_frame(encode(m)) for m in messages)


def _batch(messages: list[Any]) -> bytes:
    """The messages as one ``batch`` frame (protocol 3), as a client or server sends them."""
    return batch_frame([encode_frame(encode(m)) for m in messages])


async def _drain() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def server_route(count: int, batched: bool = False) -> float:
    server = Server(ServerConfig(), ssl_context=ssl.create_default_context())
    server._loop = asyncio.get_running_loop()

    def open_conn(name: str) -> tuple[ServerConnection, FakeTransport]:
        conn = ServerConnection(server, conn_id=1, peer="test", accepted_at=server.loop.time())
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(_frames([Hello(version=PROTOCOL_VERSION, name=name)]))
        return conn, transport

    pub, _ = open_conn("pub")
    sub, _ = open_conn("sub")
    sub.data_received(_frames([Join(room="bench", id="j")]))
    body = encode_body("x" * 126)
    pack = _batch if batched else _frames
    reads = [
        pack([Publish(room="bench", body=body, id=str(i + j)) for j in range(BATCH)])
        for i in range(0, count, BATCH)
    ]
    await _drain()
    acks = [_frames([Ack(seq=(i + 1) * BATCH)]) for i in range(len(reads))]
    start = time.perf_counter()
    for data, ack in zip(reads, acks, strict=True):
        pub.data_received(data)
        await asyncio.sleep(0)  # the subscriber's flush runs as the loop turns
        sub.data_received(ack)
    await _drain()
    took = time.perf_counter() - start
    assert sub.session is not None and sub.session.delivery.last_seq == len(reads) * BATCH
    for conn in (pub, sub):
        conn._cancel_timer()
    return took / (len(reads) * BATCH) * 1e6


async def _client() -> tuple[Client, ClientConnection, FakeTransport]:
    loop = asyncio.get_running_loop()
    client = Client(ClientConfig(name="bench"))
    conn = ClientConnection(loop, Hello(version=PROTOCOL_VERSION, name="bench"))
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    heartbeat = Heartbeat(interval=10.0, timeout=30.0)
    welcome = Welcome(
        version=PROTOCOL_VERSION,
        session="t",
        name="bench",
        resumed=False,
        heartbeat=heartbeat,
        max_frame=2**20,
    )
    conn.data_received(_frames([welcome]))
    client._connected(conn, first=True)
    return client, conn, transport


async def client_publish(count: int, batched: bool = False) -> float:
    client, conn, _ = await _client()
    body = "x" * 126
    acks = [
        _frames([ServerAck(ids=[str(i + j + 1) for j in range(BATCH)])])
        for i in range(0, count, BATCH)
    ]
    start = time.perf_counter()
    for i in range(len(acks)):
        for _ in range(BATCH):
            await client.publish("bench", body)
        await asyncio.sleep(0)  # the write
        if i:
            conn.data_received(acks[i - 1])  # the server's acks of the previous batch
    await _drain()
    took = time.perf_counter() - start
    await client.close(timeout=0)
    return took / (len(acks) * BATCH) * 1e6


async def client_receive(count: int, batched: bool = False) -> float:
    client, conn, _ = await _client()
    body = encode_body("x" * 126)
    pack = _batch if batched else _frames
    reads = [
        pack(
            [
                Delivery(room="bench", sender="pub", body=body, id=str(seq), ts=1.0, seq=seq)
                for seq in range(i + 1, i + BATCH + 1)
            ]
        )
        for i in range(0, count, BATCH)
    ]
    start = time.perf_counter()
    for data in reads:
        conn.data_received(data)
        for _ in range(BATCH):
            await client.receive()
    await _drain()
    took = time.perf_counter() - start
    await client.close(timeout=0)
    return took / (len(reads) * BATCH) * 1e6


async def main(count: int = 200_000) -> None:
    from securemsg.runner import loop_name

    print(f"loop {loop_name()}, {count:,} messages, {BATCH} frames per read (µs per message)")
    for name, bench, batched in (
        ("server route (publish in, message + ack out)", server_route, False),
        ("  the same, in batches of 64 (protocol 3)", server_route, True),
        ("client publish (batches when it writes)", client_publish, False),
        ("client receive", client_receive, False),
        ("  the same, in batches of 64 (protocol 3)", client_receive, True),
    ):
        results = [await bench(count, batched) for _ in range(3)]
        print(f"  {name:<46} {min(results):6.2f}  (runs: {', '.join(f'{r:.2f}' for r in results)})")


if __name__ == "__main__":
    from securemsg.log import configure_logging
    from securemsg.runner import run

    configure_logging(level="error")
    run(main())
