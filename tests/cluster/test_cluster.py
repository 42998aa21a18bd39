"""A cluster of nodes over a real nats-server: what a client does works across nodes, names
are unique cluster-wide, a session moves to another node with exact replay, and a node that
loses NATS sends its clients away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from securemsg import datagram
from securemsg.client.client import Client, connect
from securemsg.config import ServerConfig
from securemsg.core.messages import (
    Ack,
    Bye,
    Delivery,
    Error,
    Join,
    Leave,
    Publish,
    ServerAck,
    Welcome,
)
from securemsg.errors import AuthError, ConfigError, RejectedError
from securemsg.errors import TimeoutError as ClientTimeoutError
from securemsg.server.server import Server
from securemsg.tls.contexts import client_context
from tests.cluster.conftest import NatsServer, StartNode, free_port
from tests.integration.conftest import RawClient, server_options
from tests.integration.test_metrics import scrape

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def clients(tls_files: Any) -> Any:
    """Connect clients (one address each) that reconnect quickly; closed at the end."""
    opened: list[Client] = []

    async def open_(port: int, name: str, **options: Any) -> Client:
        options.setdefault("reconnect_base", 0.05)
        options.setdefault("reconnect_cap", 0.2)
        options.setdefault("connect_timeout", 5)
        client = await connect("localhost", port, name=name, ca=str(tls_files.ca_pem), **options)
        opened.append(client)
        return client

    yield open_
    await asyncio.gather(*(client.close(timeout=1) for client in opened))


@pytest.fixture
async def raw(tls_files: Any) -> Any:
    opened: list[RawClient] = []

    async def open_(port: int, name: str, **hello: Any) -> RawClient:
        client = await RawClient.open(port, ctx=client_context(ca=tls_files.ca_pem))
        opened.append(client)
        await client.hello(name, **hello)
        return client

    yield open_
    for client in opened:
        await client.close()


async def test_publish_reaches_members_on_every_node_through_wildcards(
    start_node: StartNode, clients: Any
) -> None:
    a, b = await start_node(), await start_node()
    alice, bob, carol = (
        await clients(a.port, "alice"),
        await clients(b.port, "bob"),
        await clients(b.port, "carol"),
    )
    await alice.join("chat.*")
    await bob.join("chat.>")
    await carol.join("chat.x")
    await carol.publish("chat.x", {"n": 1}, confirm=True)
    await alice.publish("chat.y", {"n": 2}, confirm=True)
    got = await alice.receive(timeout=5)
    assert (got.body, got.sender, got.room, got.seq) == ({"n": 1}, "carol", "chat.x", 1)
    assert [(m.body, m.sender) for m in [await bob.receive(timeout=5) for _ in range(2)]] == [
        ({"n": 1}, "carol"),
        ({"n": 2}, "alice"),
    ]
    with pytest.raises(ClientTimeoutError):  # neither its own message nor chat.y
        await carol.receive(timeout=0.3)


async def test_direct_and_request_reply_cross_nodes(start_node: StartNode, clients: Any) -> None:
    a, b = await start_node(), await start_node()
    alice, bob = await clients(a.port, "alice"), await clients(b.port, "bob")
    await alice.direct("bob", "hi", confirm=True)
    got = await bob.receive(timeout=5)
    assert (got.body, got.sender, got.to) == ("hi", "alice", "bob")
    with pytest.raises(RejectedError) as refused:
        await alice.direct("nobody", "hi", confirm=True)
    assert refused.value.code == "no_such_user"

    await bob.join("svc.time")

    async def serve() -> None:
        request = await bob.receive(timeout=5)
        await bob.reply(request, {"answer": request.body["q"] * 2})

    server = asyncio.create_task(serve())
    answer = await alice.request("svc.time", {"q": 21}, timeout=5)
    await server
    assert (answer.body, answer.sender) == ({"answer": 42}, "bob")


async def test_presence_and_who_span_three_nodes(start_node: StartNode, clients: Any) -> None:
    a, b, c = await start_node(), await start_node(), await start_node()
    alice, bob = await clients(a.port, "alice"), await clients(b.port, "bob")
    carol = await clients(c.port, "carol")
    await alice.join("room")
    await carol.join("room.>")
    events = alice.presence()
    await bob.join("room")
    async with asyncio.timeout(5):
        seen = await anext(aiter(events))
    assert (seen.room, seen.name, seen.event) == ("room", "bob", "join")
    assert await alice.who("room") == ["alice", "bob"]
    assert await carol.who("room.>") == ["carol"]
    assert await bob.who("room") == ["alice", "bob"]
    await bob.leave("room")
    async with asyncio.timeout(5):
        seen = await anext(aiter(events))
    assert (seen.name, seen.event) == ("bob", "leave")
    assert await alice.who("room") == ["alice"]


async def test_a_name_is_unique_across_nodes_and_free_again_after_bye(
    start_node: StartNode, clients: Any, tls_files: Any
) -> None:
    a, b = await start_node(), await start_node()
    alice = await clients(a.port, "alice")
    with pytest.raises(AuthError) as caught:
        await connect("localhost", b.port, ca=str(tls_files.ca_pem), name="alice")
    assert caught.value.code == "name_taken"
    await alice.close()  # bye: the name is freed cluster-wide (one KV delete)
    again = None
    async with asyncio.timeout(5):
        while again is None:  # bounded by the timeout: the delete may still be on its way
            with contextlib.suppress(AuthError):
                again = await clients(b.port, "alice")
            await asyncio.sleep(0.05)
    assert again.name == "alice"


async def test_welcome_lists_the_live_nodes(start_node: StartNode, raw: Any) -> None:
    a = await start_node(advertise="a.example:7443")
    b = await start_node(advertise="b.example:7443")
    welcome = (await raw(b.port, "alice")).welcome
    assert isinstance(welcome, Welcome)
    assert welcome.nodes == ["a.example:7443", "b.example:7443"]
    assert a.cluster is not None and a.cluster.nodes() == welcome.nodes


async def read_bodies(client: RawClient, count: int, *, ack: bool = True) -> list[tuple[int, Any]]:
    """``count`` deliveries as (seq, body), acknowledging each."""
    got = []
    while len(got) < count:
        frame = await client.recv_type(Delivery)
        got.append((frame.seq, frame.body))
        if ack:
            client.send(Ack(seq=frame.seq))
    return got


async def test_a_session_resumes_on_another_node_while_its_node_lives(
    start_node: StartNode, raw: Any, clients: Any
) -> None:
    a, b = await start_node(metrics_port=0), await start_node(metrics_port=0)
    sub = await raw(a.port, "sub")
    sub.send(Join(room="feed", id="j1"))
    assert (await sub.recv(timeout=5)).ids == ["j1"]
    pub = await clients(b.port, "pub")
    for n in range(10):
        await pub.publish("feed", n, confirm=True)
    first = await read_bodies(sub, 6)
    # The client moves to b, having read 6 of 10; a closes its old connection.
    moved = await raw(b.port, "sub", session=sub.welcome.session, last_seq=6)
    assert moved.welcome.resumed is True
    for n in range(10, 15):
        await pub.publish("feed", n, confirm=True)
    rest = await read_bodies(moved, 9)
    assert [bytes(body) for _, body in first + rest] == [b"%d" % n for n in range(15)]
    assert [seq for seq, _ in first + rest] == list(range(1, 16))
    closing = await sub.recv_type(Error)
    assert closing.code == "session_taken_over"
    # The move, in the metrics of both nodes.
    assert a.metrics is not None and b.metrics is not None
    at_a, at_b = await scrape(a.metrics.port), await scrape(b.metrics.port)
    assert at_b["securemsg_cluster_available"] == 1
    assert at_b["securemsg_cluster_nodes_live"] == 2
    assert at_b["securemsg_cluster_stream_position"] >= 15
    assert at_b["securemsg_cluster_publishes_pending"] == 0
    assert at_b["securemsg_cluster_events_total"]["session_moved"] == 1
    assert at_b["securemsg_cluster_events_total"]["cluster_connected"] == 1
    assert at_a["securemsg_cluster_events_total"]["session_moved_away"] == 1
    assert "session_moved" not in at_a["securemsg_cluster_events_total"]


async def test_joins_and_leaves_resent_after_a_move_are_known_as_duplicates(
    start_node: StartNode, raw: Any
) -> None:
    # Their first copies were carried out on the old node: the record carries their ids.
    a, b = await start_node(), await start_node()
    client = await raw(a.port, "mover")
    client.send(Join(room="hall", id="j1"))
    assert (await client.recv_type(ServerAck)).ids == ["j1"]
    client.send(Leave(room="hall", id="l1"))
    assert (await client.recv_type(ServerAck)).ids == ["l1"]
    moved = await raw(b.port, "mover", session=client.welcome.session, last_seq=0)
    assert moved.welcome.resumed is True
    # The resends of acks the client never saw: acknowledged, not carried out again.
    moved.send(Leave(room="hall", id="l1"))
    assert (await moved.recv_type(ServerAck)).ids == ["l1"]
    moved.send(Join(room="hall", id="j1"))
    assert (await moved.recv_type(ServerAck)).ids == ["j1"]
    # Had j1 been carried out again, this leave would succeed.
    moved.send(Leave(room="hall", id="l2"))
    refused = await moved.recv_type(Error)
    assert (refused.code, refused.ref) == ("not_member", "l2")


async def test_a_node_with_other_ttls_joins_the_buckets_the_first_node_made(
    start_node: StartNode, clients: Any
) -> None:
    # The buckets' ages follow session_ttl and cluster_node_timeout: JetStream refuses to
    # make an existing bucket again with other limits, which kept such a node out.
    a = await start_node()
    b = await start_node(session_ttl=100.0, cluster_node_timeout=1.0)
    alice, bob = await clients(a.port, "alice"), await clients(b.port, "bob")
    await bob.join("r", timeout=5)
    await alice.publish("r", "across", confirm=True)
    assert (await bob.receive(timeout=5)).body == "across"


async def test_losing_nats_sends_clients_away_and_refuses_hellos_until_it_is_back(
    tmp_path: Any, tls_files: Any, unit: float, raw: Any
) -> None:
    nats = NatsServer(tmp_path / "js")
    nats.start()
    options = server_options(tls_files, unit) | {"cluster": nats.url, "metrics_port": 0}
    node = Server(ServerConfig(**options | {"handshake_timeout": 50 * unit}))
    try:
        await node.start()
        assert node.metrics is not None
        alice = await raw(node.port, "alice")
        token = alice.welcome.session
        nats.stop()
        bye = await alice.recv_type(Bye)
        assert bye.reason == "node_unavailable"
        refused = await raw(node.port, "bob")
        assert isinstance(refused.welcome, Error) and refused.welcome.code == "server_busy"
        assert node.readiness_problems() == ["the cluster (NATS) is unreachable"]
        down = await scrape(node.metrics.port)
        assert down["securemsg_cluster_available"] == 0
        assert down["securemsg_cluster_events_total"]["cluster_lost"] == 1
        nats.start()  # the same store: the session records survived
        welcome = None
        async with asyncio.timeout(10):
            while not isinstance(welcome, Welcome):  # bounded by the timeout
                await asyncio.sleep(0.1)
                welcome = (await raw(node.port, "alice", session=token, last_seq=0)).welcome
        assert welcome.resumed is True
        up = await scrape(node.metrics.port)
        assert up["securemsg_cluster_available"] == 1
        assert up["securemsg_cluster_events_total"]["cluster_connected"] == 2
    finally:
        await node.close()
        nats.stop()


async def start_node_process(
    nats_url: str, tls_files: Any, log: Any, *, port: int = 0
) -> tuple[asyncio.subprocess.Process, int]:
    """A node ``node-a`` in its own process (to be killed with SIGKILL), and its port."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SECUREMSG_CLUSTER": nats_url}
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "securemsg", "server", "--host", "127.0.0.1"),
            *("--port", str(port), "--node-name", "node-a"),
            *("--cert", str(tls_files.server_cert), "--key", str(tls_files.server_key)),
            *("--log-format", "json"),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    async with asyncio.timeout(20):
        while True:  # bounded by the timeout
            for line in log.read_text().splitlines():
                if '"server_listening"' in line:
                    return process, int(json.loads(line)["port"])
            if process.returncode is not None:
                raise RuntimeError(log.read_text())
            await asyncio.sleep(0.05)


async def test_a_session_moves_when_its_node_is_killed_mid_stream_nothing_lost_or_doubled(
    start_node: StartNode, raw: Any, clients: Any, nats_url: str, tls_files: Any, tmp_path: Any
) -> None:
    b = await start_node()  # first: it made the stream and buckets of this test
    process, port = await start_node_process(nats_url, tls_files, tmp_path / "a.log")
    try:
        sub = await raw(port, "sub")
        sub.send(Join(room="feed", id="j1"))
        assert (await sub.recv(timeout=5)).ids == ["j1"]
        pub = await clients(b.port, "pub")
        total = 600

        async def publish() -> None:
            for n in range(total):
                await pub.publish("feed", n)
                if n % 20 == 0:
                    await asyncio.sleep(0.005)  # a steady stream, not one burst
            await pub.flush(timeout=10)

        publisher = asyncio.create_task(publish())
        got = await read_bodies(sub, 150)
        process.send_signal(signal.SIGKILL)  # mid-stream: the publisher keeps going
        await process.wait()
        killed_at = asyncio.get_running_loop().time()
        last_seq = got[-1][0]
        moved = await raw(b.port, "sub", session=sub.welcome.session, last_seq=last_seq)
        took = asyncio.get_running_loop().time() - killed_at
        assert isinstance(moved.welcome, Welcome) and moved.welcome.resumed is True
        got += await read_bodies(moved, total - len(got))
        await publisher
        with pytest.raises(TimeoutError):
            await moved.recv_type(Delivery, timeout=0.3)  # and nothing more
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    bodies = [int(bytes(body)) for _, body in got]
    assert bodies == list(range(total)), "lost, doubled or out of order"
    assert [seq for seq, _ in got] == list(range(1, total + 1))
    assert took < 2.0, took


async def test_a_node_killed_and_restarted_takes_its_sessions_back(
    start_node: StartNode, raw: Any, clients: Any, nats_url: str, tls_files: Any, tmp_path: Any
) -> None:
    b = await start_node()
    process, port = await start_node_process(nats_url, tls_files, tmp_path / "a.log")
    try:
        sub = await raw(port, "sub")
        sub.send(Join(room="feed", id="j1"))
        assert (await sub.recv(timeout=5)).ids == ["j1"]
        pub = await clients(b.port, "pub")
        for n in range(5):
            await pub.publish("feed", n, confirm=True)
        got = await read_bodies(sub, 3)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        for n in range(5, 8):  # while it is down
            await pub.publish("feed", n, confirm=True)
        process, again = await start_node_process(
            nats_url, tls_files, tmp_path / "a2.log", port=port
        )
        assert again == port
        back = await raw(port, "sub", session=sub.welcome.session, last_seq=3)
        assert isinstance(back.welcome, Welcome) and back.welcome.resumed is True
        got += await read_bodies(back, 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert [int(bytes(body)) for _, body in got] == list(range(8))
    assert [seq for seq, _ in got] == list(range(1, 9))


async def test_a_publish_resent_to_another_node_is_stored_once(
    start_node: StartNode, raw: Any, clients: Any
) -> None:
    a, b = await start_node(), await start_node()
    sub = await clients(b.port, "sub")
    await sub.join("feed")
    pub = await raw(a.port, "pub")
    publish = Publish(room="feed", body=msgspec.Raw(b"1"), id="p1")
    pub.send(publish)
    assert (await pub.recv_type(ServerAck)).ids == ["p1"]
    # Its ack lost in a crash, the client resends on another node: JetStream drops the copy.
    again = await raw(b.port, "pub", session=pub.welcome.session, last_seq=0)
    again.send(publish, Publish(room="feed", body=msgspec.Raw(b"2"), id="p2"))
    acked: list[str] = []
    while len(acked) < 2:  # bounded by recv's timeout
        acked += (await again.recv_type(ServerAck)).ids
    assert sorted(acked) == ["p1", "p2"]
    assert [(await sub.receive(timeout=5)).body for _ in range(2)] == [1, 2]
    with pytest.raises(ClientTimeoutError):
        await sub.receive(timeout=0.3)


async def test_publishes_and_resends_are_acknowledged_once_stored_without_a_resend_timer(
    start_node: StartNode, raw: Any, clients: Any
) -> None:
    # A node knows a publish is stored when it reads it back, and a resend after a resume
    # (which JetStream may drop as a duplicate, so it is never read back) from JetStream's
    # answer: neither waits for the sweep that resends what was not acknowledged.
    a, b = await start_node(), await start_node()
    for node in (a, b):
        assert node.cluster is not None
        node.cluster.settings = replace(node.cluster.settings, ack_timeout=600.0)
    sub = await clients(b.port, "sub")
    await sub.join("feed")
    pub = await raw(a.port, "pub")
    first = Publish(room="feed", body=msgspec.Raw(b"1"), id="p1")
    pub.send(first)
    assert (await pub.recv_type(ServerAck)).ids == ["p1"]
    again = await raw(b.port, "pub", session=pub.welcome.session, last_seq=0)
    again.send(first)
    assert (await again.recv_type(ServerAck)).ids == ["p1"]
    assert (await sub.receive(timeout=5)).body == 1
    with pytest.raises(ClientTimeoutError):
        await sub.receive(timeout=0.3)


async def test_a_burst_past_max_pending_reaches_a_subscriber_on_the_same_node_whole(
    start_node: StartNode, clients: Any
) -> None:
    # Flow control as on one server when publisher and subscriber share a node: the
    # subscriber's session never overflows, the publisher waits instead. What is between
    # the node and the stream still arrives: at most the publisher's outbox (acks wait for
    # JetStream), which max_pending must leave room for.
    node = await start_node(max_pending=500, max_outgoing_bytes=16 * 1024)
    sub = await clients(node.port, "sub")
    await sub.join("burst")
    pub = await clients(node.port, "pub", max_outbox=200)
    count = 1_500
    with capture_logs() as logs:
        reading = asyncio.create_task(read_all(sub, count, slowly=True))
        for n in range(count):
            await pub.publish("burst", n)
        await pub.flush(timeout=30)
        got = await reading
    assert got == list(range(count))
    events = {entry["event"] for entry in logs}
    assert not events & {"session_overflowed", "slow_consumer"}, events


async def read_all(client: Client, count: int, *, slowly: bool = False) -> list[Any]:
    """``count`` bodies; ``slowly``: about 1,000 a second, slower than a publisher goes."""
    got = []
    for n in range(count):
        got.append((await client.receive(timeout=10)).body)
        if slowly and n % 5 == 4:
            await asyncio.sleep(0.005)
    return got


async def test_a_datagram_publish_reaches_datagram_members_only_and_numbers_nothing(
    start_node: StartNode, clients: Any, tls_files: Any
) -> None:
    """A session's numbers follow the stream: a datagram publish numbered for a TLS member
    outside it would leave a gap nobody could replay on another node. On a node it reaches
    the node's datagram members; the TLS member's next message is still its seq 1."""
    node = await start_node()
    assert node.datagram is not None
    dashboard = await clients(node.port, "dashboard")
    await dashboard.join("sensors.>")
    ca = str(tls_files.ca_pem)
    sensor = await datagram.connect("localhost", node.port, name="sensor", ca=ca, timeout=5)
    watcher = await datagram.connect("localhost", node.port, name="watcher", ca=ca, timeout=5)
    try:
        await watcher.join("sensors.>")
        await sensor.publish("sensors.kitchen", {"c": 21.5})
        got = await watcher.receive(timeout=5)
        assert (got.body, got.datagram) == ({"c": 21.5}, True)
    finally:
        await sensor.close()
        await watcher.close()
    publisher = await clients(node.port, "alice")
    await publisher.publish("sensors.kitchen", {"c": 22.0}, confirm=True)
    got = await dashboard.receive(timeout=5)
    assert (got.body, got.datagram, got.seq) == ({"c": 22.0}, False, 1)


async def test_tls_to_nats_with_a_private_ca_and_a_client_certificate(
    tmp_path: Path, tls_files: Any, unit: float
) -> None:
    # nats-server requires TLS and verifies its clients' certificates against the test CA.
    tls = ["--tls", "--tlscert", str(tls_files.server_cert), "--tlskey", str(tls_files.server_key)]
    tls += ["--tlsverify", "--tlscacert", str(tls_files.ca_pem)]
    nats = NatsServer(tmp_path / "js", tls=tls)
    nats.start()
    base = server_options(tls_files, unit) | {"cluster": nats.url, "datagram_port": "off"}
    # Go refuses trustme's certificates without a subject alternative name: give it one.
    node_cert, node_key = tmp_path / "node.pem", tmp_path / "node.key"
    leaf = tls_files.ca.issue_cert("node.securemsg.test")
    leaf.private_key_pem.write_to_path(str(node_key))
    leaf.cert_chain_pems[0].write_to_path(str(node_cert))
    mutual = {"cluster_ca": str(tls_files.ca_pem), "cluster_cert": str(node_cert)}
    mutual["cluster_key"] = str(node_key)
    try:
        node = Server(ServerConfig(**base, **mutual))
        await node.start()
        try:
            options: dict[str, Any] = {"ca": str(tls_files.ca_pem), "connect_timeout": 5}
            async with (
                connect("localhost", node.port, name="alice", **options) as alice,
                connect("localhost", node.port, name="bob", **options) as bob,
            ):
                await bob.join("r", timeout=5)
                await alice.publish("r", "over TLS to NATS", confirm=True)
                assert (await bob.receive(timeout=5)).body == "over TLS to NATS"
        finally:
            await node.close()
        # A server certificate we cannot trust is said at once, in one sentence: no retry
        # mends it (the retries of a refused connection take 6 s).
        node = Server(ServerConfig(**base, **mutual | {"cluster_ca": str(tls_files.other_ca_pem)}))
        started = time.monotonic()
        said = "its certificate is not trusted .*: check cluster_ca$"
        with pytest.raises(ConfigError, match=f"^cannot reach the cluster at {nats.url}: {said}"):
            await node.start()
        assert time.monotonic() - started < 5
        await node.close()
    finally:
        nats.stop()


async def test_a_node_that_cannot_reach_nats_at_start_fails_in_one_sentence(
    tls_files: Any, unit: float
) -> None:
    """nats-py retries a first connect forever when reconnects are unbounded: the node hung
    at start (and ignored SIGTERM meanwhile) instead of saying what is wrong."""
    nobody = f"nats://127.0.0.1:{free_port()}"
    # The first connect waits 3 x cluster_request_timeout (2 s): shortened here, where every
    # attempt is refused at once.
    options = server_options(tls_files, unit) | {
        "cluster": nobody,
        "datagram_port": "off",
        "cluster_request_timeout": 3 * unit,
    }
    node = Server(ServerConfig(**options))
    assert node.cluster is not None
    assert node.cluster.link.settings.request_timeout == 3 * unit
    match = f"^cannot reach the cluster at {nobody}: no connection \\(connection refused\\)$"
    with pytest.raises(ConfigError, match=match):
        async with asyncio.timeout(20):
            await node.start()
