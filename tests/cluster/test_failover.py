"""A client over real cluster nodes (subprocesses, so one can be killed with SIGKILL): it
learns every node from the one it was given and, when that node dies mid-stream, resumes
its session on another within one backoff step, missing nothing and doubling nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from securemsg.bench.cluster import nats_server_path
from securemsg.client.client import Reconnected, Reconnecting, StateChange, connect
from securemsg.config import ServerConfig
from tests.cluster.conftest import StartNodeProcess

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(nats_server_path() is None, reason="nats-server is not on PATH"),
    pytest.mark.skipif(
        "cluster" not in ServerConfig.__struct_fields__, reason="no server --cluster here"
    ),
]

COUNT = 300


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
