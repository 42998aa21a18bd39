"""Flow control across nodes, over a real nats-server: a publisher on one node is held back by
a subscriber on another that does not keep up, instead of that subscriber's session
overflowing; and a stuck subscriber is cut after ``slow_consumer_timeout`` while a publisher
on another node waits for it (docs/protocol.md section 5, docs/cluster.md)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from structlog.testing import capture_logs

from securemsg.client.client import Client, connect
from securemsg.core.messages import Join, ServerAck
from securemsg.server.server import Server
from securemsg.tls.contexts import client_context
from tests.cluster.conftest import StartNode
from tests.integration.conftest import RawClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def clients(tls_files: Any) -> Any:
    opened: list[Client] = []

    async def open_(port: int, name: str, **options: Any) -> Client:
        options.setdefault("connect_timeout", 5)
        client = await connect("localhost", port, name=name, ca=str(tls_files.ca_pem), **options)
        opened.append(client)
        return client

    yield open_
    await asyncio.gather(*(client.close(timeout=1) for client in opened))


async def watch_waiting(node: Server, name: str, seen: list[int]) -> None:
    """Count the turns in which ``name``'s session on ``node`` waits for a congested one."""
    while True:  # bounded: cancelled by the test
        session = node.broker.by_name.get(name)
        if session is not None and session.waiting_on:
            seen.append(1)
        await asyncio.sleep(0.001)


async def test_a_publisher_on_another_node_is_held_back_and_the_slow_subscriber_gets_all(
    start_node: StartNode, clients: Any
) -> None:
    # 10x max_pending, published as fast as the client goes, to a subscriber on the other
    # node that reads about 1,000 a second: every message arrives, in order, the session
    # never overflows, and the publisher is seen waiting (its node stopped reading it).
    a = await start_node(max_pending=200, max_outgoing_bytes=16 * 1024)
    b = await start_node(max_pending=200, max_outgoing_bytes=16 * 1024)
    sub = await clients(b.port, "sub")
    await sub.join("burst")
    pub = await clients(a.port, "pub", max_outbox=50)
    count, seen = 2_000, list[int]()
    watcher = asyncio.create_task(watch_waiting(a, "pub", seen))
    with capture_logs() as logs:
        reading = asyncio.create_task(read_all(sub, count))
        for n in range(count):
            await pub.publish("burst", n)
        await pub.flush(timeout=30)
        got = await reading
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert got == list(range(count))
    events = {entry["event"] for entry in logs}
    assert not events & {"session_overflowed", "slow_consumer"}, events
    assert seen, "the publisher never waited for the remote subscriber"
    assert sub.state.name == "CONNECTED"
    # Relieved: nothing is left announced on b, nor waited for on a.
    await asyncio.sleep(0.05)
    assert not b.broker.announced
    assert not a.broker.elsewhere.by_key
    assert not a.broker.by_name["pub"].waiting_on


async def test_a_stuck_subscriber_is_cut_while_a_publisher_on_another_node_waits(
    start_node: StartNode, clients: Any, tls_files: Any, unit: float
) -> None:
    timeout = 5 * unit
    # Room for what the publisher's node accepts while the note travels: its outbox (50)
    # and more, on a busy machine.
    options = {"max_pending": 200, "max_outgoing_bytes": 16 * 1024}
    a = await start_node(**options)
    b = await start_node(slow_consumer_timeout=timeout, **options)
    fast = await clients(b.port, "fast")
    await fast.join("r")
    stuck = await RawClient.open(b.port, ctx=client_context(ca=tls_files.ca_pem))
    try:
        await stuck.hello("stuck")
        stuck.send(Join(room="r", id="j"))
        await stuck.recv_type(ServerAck)
        stuck.writer.transport.pause_reading()  # neither reads nor acknowledges from here
        pub = await clients(a.port, "pub", max_outbox=50)
        count, longest = 1_000, 0.0
        loop = asyncio.get_running_loop()
        with capture_logs() as logs:
            reading = asyncio.create_task(read_all(fast, count, pace=0))
            for n in range(count):
                started = loop.time()
                await pub.publish("r", n)
                longest = max(longest, loop.time() - started)
            await pub.flush(timeout=30)
            got = await reading
    finally:
        await stuck.close()
    assert got == list(range(count))
    cut = [entry for entry in logs if entry["event"] == "slow_consumer"]
    overflowed = [entry for entry in logs if entry["event"] == "session_overflowed"]
    assert [entry["name"] for entry in cut] == ["stuck"], (cut, overflowed)
    assert not overflowed
    assert "stuck" not in b.broker.by_name  # ended: a resume is told of the gap
    # The publisher waited for the stuck one, not much longer than the timeout (the check
    # runs every quarter of it; generous for a busy machine).
    assert timeout / 2 <= longest <= 4 * timeout + 20 * unit


async def read_all(client: Client, count: int, *, pace: float = 0.005) -> list[Any]:
    """``count`` bodies, pausing ``pace`` seconds every 5 (about 1,000 a second)."""
    got = []
    for n in range(count):
        got.append((await client.receive(timeout=10)).body)
        if pace and n % 5 == 4:
            await asyncio.sleep(pace)
    return got
