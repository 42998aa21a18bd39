"""A client over real cluster nodes (subprocesses, so one can be killed with SIGKILL): it
learns every node from the one it was given and, when that node dies mid-stream, resumes
its session on another within one backoff step, missing nothing and doubling nothing."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any

import pytest

from securemsg.bench.cluster import nats_server_path
from securemsg.client.client import Client, Reconnected, Reconnecting, StateChange, connect
from securemsg.config import ServerConfig
from securemsg.core.frames import FrameDecoder
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Hello,
    Join,
    ServerAck,
    Welcome,
    decode_server,
    encode_frame_of,
)
from securemsg.errors import AuthError
from securemsg.tls.contexts import client_context
from tests.cluster.conftest import StartNodeProcess
from tests.faults import record_figure

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(nats_server_path() is None, reason="nats-server is not on PATH"),
    pytest.mark.skipif(
        "cluster" not in ServerConfig.__struct_fields__, reason="no server --cluster here"
    ),
]

COUNT = 300
#: Sessions live 1 s after their node's death, which is found after 1 s.
FAST_EXPIRY = ("--session-ttl", "1", "--cluster-node-timeout", "1")


async def test_a_client_learns_the_nodes_and_resumes_elsewhere_when_its_node_is_killed(
    start_node_process: StartNodeProcess, tls_files: Any, unit: float
) -> None:
    nodes = [await start_node_process(f"node{i}") for i in range(3)]
    ca = str(tls_files.ca_pem)
    settings: dict[str, Any] = {"ca": ca, "reconnect_base": unit, "reconnect_cap": 4 * unit}
    # Alice is given the first node only; bob publishes through the second.
    async with (
        connect(nodes[0].address, name="alice", **settings) as alice,
        connect(nodes[1].address, name="bob", **settings) as bob,
    ):
        assert sorted(alice.servers) == sorted(node.address for node in nodes)
        await alice.join("stream", timeout=10)
        changes: list[StateChange] = []

        async def record() -> None:
            async for change in alice.state_changes():
                changes.append(change)

        recorder = asyncio.create_task(record())
        received: list[int] = []

        async def receive() -> None:
            while len(received) < COUNT:
                received.append((await alice.receive(timeout=20)).body)

        receiver = asyncio.create_task(receive())
        for number in range(COUNT):
            await bob.publish("stream", number)
            if number == COUNT // 2:
                await asyncio.to_thread(nodes[0].kill)
            await asyncio.sleep(0.002)
        await bob.flush(timeout=20)
        await asyncio.wait_for(receiver, 30)
        recorder.cancel()
        assert received == list(range(COUNT))  # 0 lost, 0 duplicated, 0 out of order
        assert alice.address != nodes[0].address
        moved = next(c for c in changes if isinstance(c, Reconnected))
        assert moved == Reconnected(resumed=True, gap=0)
        # Within one backoff step: the first attempt, at the next address, was welcomed.
        attempts = [c for c in changes[: changes.index(moved)] if isinstance(c, Reconnecting)]
        assert [a.attempt for a in attempts] == [1]


def _ghost(address: str, ca: str, room: str, name: str = "ghost") -> ssl.SSLSocket:
    """A client that joins ``room`` and never reconnects once its node is gone (a bare TLS
    socket speaking the protocol: no backoff, no resume)."""
    host, port = address.rsplit(":", 1)
    sock = client_context(ca=ca).wrap_socket(
        socket.create_connection((host, int(port)), timeout=10), server_hostname="localhost"
    )
    decoder = FrameDecoder(1 << 20)

    def until(kind: type) -> None:
        while not any(isinstance(decode_server(p), kind) for p in decoder.feed(sock.recv(65536))):
            pass

    sock.sendall(encode_frame_of(Hello(version=PROTOCOL_VERSION, name=name)))
    until(Welcome)
    sock.sendall(encode_frame_of(Join(room=room, id="j1")))
    until(ServerAck)
    return sock


class PresenceLog:
    """The presence events a client hears, in order, and a bounded wait for one."""

    def __init__(self, client: Client) -> None:
        self.events: list[tuple[str, str]] = []
        self._task = asyncio.create_task(self._watch(client))

    async def _watch(self, client: Client) -> None:
        async for note in client.presence():
            self.events.append((note.name, note.event))

    async def seen(self, name: str, event: str, *, within: float = 30.0) -> float:
        """Seconds until ``name`` ``event`` was heard; AssertionError past ``within``."""
        started = time.monotonic()
        while (name, event) not in self.events:
            if time.monotonic() - started > within:
                raise AssertionError(f"no {event} of {name} in {within:g} s: {self.events}")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    def close(self) -> None:
        self._task.cancel()


async def test_a_dead_nodes_session_that_nobody_resumes_expires_with_presence_after_session_ttl(
    start_node_process: StartNodeProcess, tls_files: Any, unit: float
) -> None:
    # node0 dies with two sessions: alice resumes on node1 at once, ghost never comes back.
    nodes = [await start_node_process(f"node{i}", *FAST_EXPIRY) for i in range(2)]
    ca = str(tls_files.ca_pem)
    settings: dict[str, Any] = {"ca": ca, "reconnect_base": unit, "reconnect_cap": 4 * unit}
    async with (
        connect(nodes[0].address, name="alice", **settings) as alice,
        connect(nodes[1].address, name="bob", **settings) as bob,
    ):
        await bob.join("hall", timeout=10)
        await alice.join("hall", timeout=10)
        presence = PresenceLog(bob)
        ghost = await asyncio.to_thread(_ghost, nodes[0].address, ca, "hall")
        try:
            await presence.seen("ghost", "join")
            await asyncio.to_thread(nodes[0].kill)
            # Expiry: session_ttl (1 s) after node0 is seen dead (1 s), at the next sweep
            # (every 1 s): about 3 s at most.
            waited = await presence.seen("ghost", "leave")
            record_figure(
                "a dead node's unresumed session expires (session_ttl 1 s, node timeout 1 s)",
                leave_after_kill_s=round(waited, 2),
            )
            # Alice resumed on node1 before her session could expire: still a member, and
            # nobody was told she left.
            await bob.publish("hall", "still here?")
            assert (await alice.receive(timeout=10)).body == "still here?"
            assert ("alice", "leave") not in presence.events
            assert alice.address == nodes[1].address
        finally:
            presence.close()
            ghost.close()
        # The name is free again: a new ghost is welcomed on node1.
        async with connect(nodes[1].address, name="ghost", **settings) as again:
            assert again.name == "ghost"


async def test_a_node_restarted_under_its_name_keeps_neither_its_old_sessions_nor_names(
    start_node_process: StartNodeProcess, tls_files: Any, unit: float
) -> None:
    # Node names default to host:port, so a restarted node is usually "alive" again at
    # once: the sessions of the process before must still end, as a dead node's do.
    nodes = [await start_node_process(f"node{i}", *FAST_EXPIRY) for i in range(2)]
    ca = str(tls_files.ca_pem)
    settings: dict[str, Any] = {"ca": ca, "reconnect_base": unit, "reconnect_cap": 4 * unit}
    async with connect(nodes[1].address, name="bob", **settings) as bob:
        await bob.join("hall", timeout=10)
        presence = PresenceLog(bob)
        ghosts = [
            await asyncio.to_thread(_ghost, nodes[0].address, ca, "hall", name)
            for name in ("taken", "forgotten")
        ]
        try:
            await presence.seen("forgotten", "join")
            await asyncio.to_thread(nodes[0].kill)
            await asyncio.to_thread(nodes[0].start)  # same name, same port
            # "taken": its name is taken over by a new client (once node1 has heard the new
            # incarnation, within a beat), which ends the old session with presence.
            taker = None
            for _ in range(50):
                try:
                    taker = await connect(nodes[1].address, name="taken", **settings)
                    break
                except AuthError:  # name_taken: the old incarnation still seemed alive
                    await asyncio.sleep(0.1)
            assert taker is not None
            await taker.close()
            await presence.seen("taken", "leave")
            # "forgotten": nobody takes it: it expires session_ttl after the restart.
            await presence.seen("forgotten", "leave")
        finally:
            presence.close()
            for ghost in ghosts:
                ghost.close()
