"""``batch`` frames (protocol 3) over real TLS: a fast publisher's messages travel in batches
both ways, and arrive all, once and in order; a protocol 2 client never sees a batch; each
item is rate-limited and deduplicated on its own; a flood of batches starves nobody."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from securemsg.core.frames import encode_frame
from securemsg.core.messages import (
    Delivery,
    DeliveryBatch,
    Error,
    Join,
    Ping,
    Pong,
    Publish,
    ServerAck,
)
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


@pytest.mark.serial
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


def _batch_frame(*items: bytes) -> bytes:
    return encode_frame(b'{"type":"batch","items":[' + b",".join(items) + b"]}")


def _publish(msg_id: str, room: str = "r") -> bytes:
    return b'{"type":"publish","room":"%s","body":"%s","id":"%s"}' % (
        room.encode(),
        msg_id.encode(),
        msg_id.encode(),
    )


async def test_each_item_of_a_batch_counts_against_the_rate_limit(
    start_server: Any, raw: Any
) -> None:
    server = await start_server(max_msgs_per_sec=2)  # a bucket of two
    alice = await raw(server.port, "alice")
    alice.send_raw(_batch_frame(*(_publish(str(i)) for i in range(5))))
    acked: list[str] = []
    limited: list[str | None] = []
    while len(acked) + len(limited) < 5:
        frame = await alice.recv()
        if isinstance(frame, ServerAck):
            acked += frame.ids
        elif isinstance(frame, Error):
            assert frame.code == "rate_limited"
            limited.append(frame.ref)
    assert (acked, limited) == (["0", "1"], ["2", "3", "4"])


async def test_a_resent_batch_is_acknowledged_again_but_delivered_once(
    start_server: Any, raw: Any
) -> None:
    server = await start_server()
    bob, alice = await raw(server.port, "bob"), await raw(server.port, "alice")
    bob.send(Join(room="r", id="j"))
    await bob.recv_type(ServerAck)
    frame = _batch_frame(*(_publish(str(i)) for i in range(3)))
    for _ in range(2):  # as a client resends what a cut left unacknowledged
        alice.send_raw(frame)
        acked: list[str] = []
        while len(acked) < 3:
            acked += (await alice.recv_type(ServerAck)).ids
        assert acked == ["0", "1", "2"]
    alice.send(Publish(room="r", body=msgspec.Raw(b'"last"'), id="last"))
    bodies = []
    while not bodies or bodies[-1] != "last":
        bodies.append(msgspec.json.decode((await bob.recv_type(Delivery)).body))
    assert bodies == ["0", "1", "2", "last"]
