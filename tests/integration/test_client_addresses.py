"""A client given several servers (the nodes of a cluster) over real TLS on 127.0.0.1.

Plain single servers stand in for nodes: no cluster is needed to see which address the
client tries and when. Where a node must advertise ``nodes`` in ``welcome`` or say ``bye``
{``node_unavailable``}, :class:`~tests.integration.fakenode.FakeNode` plays it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
from typing import Any

import pytest

import securemsg
from securemsg.client.client import Reconnected, Reconnecting, connect
from securemsg.core.messages import BYE_NODE_UNAVAILABLE, BYE_SERVER_SHUTDOWN
from securemsg.errors import ConnectError
from tests.integration.conftest import OpenClient, StartServer
from tests.integration.fakenode import FakeNode
from tests.integration.test_client import free_port, next_event

pytestmark = pytest.mark.timeout(30)


def options(tls_files: Any, unit: float, **more: Any) -> dict[str, Any]:
    return {
        "ca": str(tls_files.ca_pem),
        "reconnect_base": unit / 2,
        "reconnect_cap": 2 * unit,
        "connect_timeout": 20 * unit,
    } | more


async def test_a_dead_first_address_is_passed_over_for_a_live_one(
    start_server: StartServer, tls_files: Any, unit: float
) -> None:
    live = await start_server()
    dead = f"localhost:{free_port()}"
    async with connect([dead, f"localhost:{live.port}"], name="alice", **options(tls_files, unit)):
        pass
    # The same as one string, and the port of an address without one is `port`.
    async with connect(
        f"{dead},localhost", live.port, name="bob", **options(tls_files, unit)
    ) as bob:
        assert bob.address == f"localhost:{live.port}"
        assert bob.servers == [dead, f"localhost:{live.port}"]
        await bob.join("room", timeout=2)


async def test_when_every_address_fails_the_error_names_each_of_them(
    tls_files: Any, unit: float
) -> None:
    first, second = free_port(), free_port()
    with pytest.raises(ConnectError, match="no server answered") as caught:
        await connect(f"localhost:{first},localhost:{second}", **options(tls_files, unit))
    assert f"localhost:{first}" in str(caught.value)
    assert f"localhost:{second}" in str(caught.value)


async def test_a_lost_connection_resumes_at_the_next_address(
    start_server: StartServer, tls_files: Any, unit: float
) -> None:
    first, second = await start_server(), await start_server()
    given = f"localhost:{first.port},localhost:{second.port}"
    async with connect(given, name="alice", **options(tls_files, unit)) as alice:
        await alice.join("chat", timeout=2)
        changes = alice.state_changes()
        await first.close()  # bye server_shutdown
        # The second server does not know the session (they are not a cluster): it starts
        # a new one and the client joins its rooms again there.
        await next_event(changes, Reconnected, 3)
        assert alice.address == f"localhost:{second.port}"
        async with connect(
            f"localhost:{second.port}", name="bob", **options(tls_files, unit)
        ) as bob:
            await alice.flush(timeout=2)
            await bob.publish("chat", "on the second", confirm=True, timeout=2)
            assert (await alice.receive(timeout=2)).body == "on the second"


async def test_a_node_that_lost_the_cluster_is_left_at_once_for_the_next_one(
    server_ssl_context: ssl.SSLContext, tls_files: Any, unit: float
) -> None:
    async with (
        FakeNode(server_ssl_context, session="s1") as lost,
        FakeNode(server_ssl_context, session="s1", resumed=True) as other,
    ):
        # A backoff of 30 s: only the immediate first attempt can reach the other node.
        settings = options(tls_files, unit, reconnect_base=30.0, reconnect_cap=30.0)
        async with connect([lost.address, other.address], name="alice", **settings) as alice:
            changes = alice.state_changes()
            lost.deliver(1, "chat", "one")
            lost.deliver(2, "chat", "two")
            assert [(await alice.receive(timeout=2)).body for _ in range(2)] == ["one", "two"]
            lost.bye(BYE_NODE_UNAVAILABLE)
            attempt = await next_event(changes, Reconnecting, 2)
            assert attempt.delay == 0.0
            assert await next_event(changes, Reconnected, 2) == Reconnected(resumed=True, gap=0)
            assert alice.address == other.address
            # Resumed: the same session, and the last message dealt with (the one taken
            # last is dealt with once the application asks for the next).
            resume = other.hellos[-1]
            assert (resume.session, resume.last_seq) == ("s1", 1)


async def test_any_other_bye_waits_for_the_backoff_before_the_next_address(
    server_ssl_context: ssl.SSLContext, tls_files: Any, unit: float
) -> None:
    async with FakeNode(server_ssl_context) as lost, FakeNode(server_ssl_context) as other:
        settings = options(tls_files, unit, reconnect_base=2 * unit, reconnect_cap=2 * unit)
        async with connect([lost.address, other.address], name="alice", **settings) as alice:
            changes = alice.state_changes()
            lost.bye(BYE_SERVER_SHUTDOWN)
            # Drawn from the schedule (uniform from 0 to the base), not the immediate attempt.
            attempt = await next_event(changes, Reconnecting, 2)
            assert attempt.delay > 0.0
            await next_event(changes, Reconnected, 3)
            assert alice.address == other.address


async def test_nodes_advertised_in_welcome_are_learned_and_used(
    server_ssl_context: ssl.SSLContext,
    start_server: StartServer,
    tls_files: Any,
    unit: float,
) -> None:
    live = await start_server()
    learned = f"localhost:{live.port}"
    async with FakeNode(server_ssl_context, nodes=["localhost:1", learned]) as node:
        # Given only the fake node, the client learns the other two from its welcome.
        async with connect(node.address, name="alice", **options(tls_files, unit)) as alice:
            assert alice.servers[0] == node.address
            assert sorted(alice.servers[1:]) == sorted(["localhost:1", learned])
            changes = alice.state_changes()
            node.bye(BYE_NODE_UNAVAILABLE)
            # Whatever order the learned ones took, the live one is reached before the fake
            # node comes round again (it stays up: it would welcome the client).
            await next_event(changes, Reconnected, 5)
            assert alice.address == learned
            assert len(node.hellos) == 1


async def test_the_blocking_client_takes_several_addresses_too(
    start_server: StartServer, tls_files: Any, unit: float
) -> None:
    live = await start_server()
    given = f"localhost:{free_port()},localhost:{live.port}"

    def run() -> str:
        with securemsg.sync.connect(given, name="alice", **options(tls_files, unit)) as client:
            client.join("room", timeout=2)
            return client.address

    assert await asyncio.to_thread(run) == f"localhost:{live.port}"


async def test_the_commands_take_a_comma_separated_address(
    start_server: StartServer, open_client: OpenClient, tls_files: Any
) -> None:
    live = await start_server()
    bob = await open_client(live.port, "bob")
    await bob.join("room", timeout=2)
    given = f"localhost:{free_port()},localhost:{live.port}"
    argv = [sys.executable, "-m", "securemsg", "send", given, "--room", "room"]
    argv += ["--ca", str(tls_files.ca_pem), "--name", "alice", "hello"]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert (await bob.receive(timeout=2)).body == "hello"


async def test_a_bad_address_in_a_list_is_one_sentence(tls_files: Any) -> None:
    argv = [sys.executable, "-m", "securemsg", "listen", "localhost:1,localhost:x", "--room", "r"]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 1
    assert stderr.decode().strip() == (
        "securemsg: 'localhost:1,localhost:x': 'localhost:x': "
        "the port must be a number from 1 to 65535"
    )


async def test_bench_over_two_nodes_puts_publishers_on_the_first_and_subscribers_on_the_second(
    start_server: StartServer, tls_files: Any
) -> None:
    from securemsg.bench.run import BenchOptions, run_bench
    from tests.faults import FaultProxy

    server = await start_server()
    # One server under two addresses: itself, and a proxy in front of it that counts.
    async with FaultProxy(server.port) as proxy:
        servers = (f"localhost:{server.port}", f"localhost:{proxy.port}")
        options = BenchOptions(
            scenario="pubsub", ca=str(tls_files.ca_pem), msgs=2_000, unpaced=True, servers=servers
        )
        result = await run_bench(options)
        assert (result.received, result.lost, result.duplicated) == (2_000, 0, 0)
        assert result.server == ",".join(servers)
        assert proxy.connections == 1  # the subscriber's, not the publisher's
        assert proxy.bytes["down"] > 2_000 * 128  # every message came down through it


async def test_the_blocking_client_waits_for_one_connect_timeout_per_address(
    start_server: StartServer, tls_files: Any
) -> None:
    live = await start_server()
    # Two listeners that never accept: each attempt takes the whole connect_timeout, longer
    # in all than one connect_timeout and the blocking client's grace together.
    holes = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        given = [f"localhost:{hole.getsockname()[1]}" for hole in holes]
        given.append(f"localhost:{live.port}")

        def run() -> str:
            with securemsg.sync.connect(
                given, name="alice", ca=str(tls_files.ca_pem), connect_timeout=1.5
            ) as client:
                return client.address

        assert await asyncio.to_thread(run) == f"localhost:{live.port}"
    finally:
        for hole in holes:
            hole.close()


async def test_doctor_diagnoses_each_node_of_a_list(
    start_server: StartServer, tls_files: Any
) -> None:
    from tests.integration.test_doctor import securemsg as run_command

    live = await start_server()
    dead, alive = f"localhost:{free_port()}", f"localhost:{live.port}"
    given = f"{alive},{dead}"
    status, out, err = await run_command("doctor", given, "--ca", str(tls_files.ca_pem), "--json")
    assert status == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert [(t["target"], t["ok"]) for t in report["targets"]] == [(alive, True), (dead, False)]
    (line,) = err.strip().splitlines()
    assert line.startswith(f"securemsg: doctor: {dead}: ")
