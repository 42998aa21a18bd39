"""``batch`` frames (protocol 3) over real TLS: a fast publisher's messages travel in batches
both ways, and arrive all, once and in order; a protocol 2 client never sees a batch."""

from __future__ import annotations

import asyncio
from typing import Any

from securemsg.core.frames import encode_frame
from securemsg.core.messages import Delivery, DeliveryBatch, Join, Ping, Pong, ServerAck
from tests.faults import wait_until

COUNT = 2_000


def _server_side(server: Any, name: str) -> Any:
    [conn] = [c for c in server.connections if c.session is not None and c.session.name == name]
    return conn


async def test_a_fast_publisher_batches_and_nothing_is_lost_doubled_or_reordered(
    start_server: Any, open_client: Any, unit: float
) -> None:
    server = await start_server()
    sub = await open_client(server.port, "sub")
    pub = await open_client(server.port, "pub")
    await sub.join("feed")
    for index in range(COUNT):
        await pub.publish("feed", index)
    await pub.flush(timeout=50 * unit)
    received = []
    async with asyncio.timeout(50 * unit):
        while len(received) < COUNT:
            received.append((await sub.receive()).body)
    assert received == list(range(COUNT))
    # Fewer frames than messages on both legs: the publishes and the deliveries went in
    # batches (each frame is one read's worth of them, however the loop turned).
    assert _server_side(server, "pub").core.frames_in < COUNT
    assert sub._mailbox.conn.core.frames_in < COUNT


async def test_a_protocol_2_client_gets_one_message_frame_each(
    start_server: Any, open_client: Any, raw: Any, unit: float
) -> None:
    server = await start_server()
    old = await raw(server.port, "old")  # RawClient says version 2 in its hello
    assert old.welcome.version == 2
    old.send(Join(room="feed", id="j"))
    await old.recv_type(ServerAck)
    pub = await open_client(server.port, "pub")
    for index in range(200):
        await pub.publish("feed", index)
    await pub.flush(timeout=50 * unit)
    bodies = []
    while len(bodies) < 200:
        frame = await old.recv(timeout=50 * unit)
        assert not isinstance(frame, DeliveryBatch)
        if isinstance(frame, Delivery):
            bodies.append(int(frame.body))
    assert bodies == list(range(200))
    # ... while the publisher, on protocol 3, sent batches.
    assert _server_side(server, "pub").core.frames_in < 200


async def test_a_flood_of_full_batches_does_not_starve_other_clients(
    start_server: Any, raw: Any
) -> None:
    # A batch is carried out whole: at most 1,024 messages in one go, then the others' turn.
    server = await start_server()
    flooder, alice = await raw(server.port, "flooder"), await raw(server.port, "alice")
    loop = asyncio.get_running_loop()
    item = b'{"type":"publish","room":"void","body":"x"}'
    batch = encode_frame(b'{"type":"batch","items":[' + b",".join([item] * 1024) + b"]}")
    total = 1024 * 100
    drain = asyncio.ensure_future(flooder.reader.read(-1))
    flooder.send_raw(batch * 100)
    await wait_until(lambda: server.broker.messages_received > 0, within=10.0)
    delays = []
    # Ping while the flood is being carried out (bounded: 500 pings at most).
    for index in range(500):
        if server.broker.messages_received >= total:
            break
        start = loop.time()
        alice.send(Ping(id=index))
        assert await alice.recv_type(Pong) == Pong(id=index)
        delays.append(loop.time() - start)
    drain.cancel()
    assert len(delays) >= 3, "the flood was over before the pings could measure it"
    delays.sort()
    assert delays[int(len(delays) * 0.99) - 1] < 0.2, delays
