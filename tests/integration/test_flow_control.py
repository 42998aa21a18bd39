"""Flow control over real TLS: a fast publisher is held back instead of its subscribers losing
messages, and a stuck subscriber is cut after ``slow_consumer_timeout`` instead of holding
everyone hostage (docs/protocol.md, "Flow control")."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from securemsg.client.client import Client
from securemsg.core.messages import Join, ServerAck
from tests.integration.conftest import OpenClient, StartServer


async def read(client: Client, count: int, timeout: float) -> list[Any]:
    return [(await client.receive(timeout=timeout)).body for _ in range(count)]


async def test_a_burst_far_past_max_pending_reaches_a_reading_subscriber_whole(
    start_server: StartServer, open_client: OpenClient, unit: float
) -> None:
    # 20x max_pending, published as fast as the client goes: the subscriber's session must
    # never overflow; the publisher waits instead.
    server = await start_server(max_pending=200, max_outgoing_bytes=16 * 1024)
    sub = await open_client(server.port, "sub")
    await sub.join("burst")
    pub = await open_client(server.port, "pub", max_outbox=1_000)
    count = 4_000
    with capture_logs() as logs:
        reading = asyncio.create_task(read(sub, count, timeout=100 * unit))
        for n in range(count):
            await pub.publish("burst", n)
        await pub.flush(timeout=300 * unit)
        got = await reading
    assert got == list(range(count))
    events = {e["event"] for e in logs}
    assert not events & {"session_overflowed", "slow_consumer"}, events
    assert sub.state.name == "CONNECTED"


async def test_a_stuck_subscriber_is_cut_after_the_timeout_and_the_others_get_everything(
    start_server: StartServer, open_client: OpenClient, raw: Any, unit: float
) -> None:
    timeout = 5 * unit
    server = await start_server(
        max_pending=100, max_outgoing_bytes=16 * 1024, slow_consumer_timeout=timeout
    )
    fast = await open_client(server.port, "fast")
    await fast.join("r")
    stuck = await raw(server.port, "stuck")  # joins, then neither reads nor acknowledges
    stuck.send(Join(room="r", id="j"))
    await stuck.recv_type(ServerAck)
    stuck.writer.transport.pause_reading()
    pub = await open_client(server.port, "pub", max_outbox=200)
    count, longest = 1_000, 0.0
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        reading = asyncio.create_task(read(fast, count, timeout=100 * unit))
        for n in range(count):
            started = loop.time()
            await pub.publish("r", n)
            longest = max(longest, loop.time() - started)
        await pub.flush(timeout=100 * unit)
        got = await reading
    assert got == list(range(count))
    cut = [e for e in logs if e["event"] == "slow_consumer"]
    assert [e["name"] for e in cut] == ["stuck"]
    assert cut[0]["waiting_publishers"] == 1
    assert "stuck" not in server.broker.by_name  # ended: a resume is told of the gap
    assert not [e for e in logs if e["event"] == "session_overflowed"]
    # The publisher waited for the stuck one, but not much longer than the timeout (the
    # check runs every quarter of it; generous for a busy machine).
    assert timeout / 2 <= longest <= 4 * timeout + 20 * unit


async def test_a_direct_to_a_stuck_user_holds_the_sender_back_until_the_user_is_cut(
    start_server: StartServer, open_client: OpenClient, raw: Any, unit: float
) -> None:
    server = await start_server(max_pending=40, slow_consumer_timeout=3 * unit)
    stuck = await raw(server.port, "stuck")
    stuck.writer.transport.pause_reading()
    sender = await open_client(server.port, "sender", max_outbox=100)
    with capture_logs() as logs:
        for n in range(100):
            try:
                await sender.direct("stuck", n, confirm=True, timeout=100 * unit)
            except Exception as exc:  # once stuck is cut: no_such_user
                assert getattr(exc, "code", None) == "no_such_user", exc
                break
        else:
            raise AssertionError("the stuck user was never cut")
    assert any(e["event"] == "slow_consumer" and e["name"] == "stuck" for e in logs)
