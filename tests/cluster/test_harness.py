"""The cluster test harness itself: nats-server comes up with JetStream and restarts on its
store; a node subprocess welcomes, dies by SIGKILL and comes back on its port."""

from __future__ import annotations

import asyncio

import pytest

from securemsg.bench.cluster import NatsServer, probe_welcome
from securemsg.client.client import connect
from tests.cluster.conftest import StartNodeProcess

pytestmark = pytest.mark.timeout(60)


async def test_nats_server_runs_jetstream_and_keeps_its_stream_across_a_restart(
    nats_process: NatsServer,
) -> None:
    import nats as nats_py

    server = nats_process

    nc = await nats_py.connect(server.url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name="HARNESS", subjects=["harness.>"])
        ack = await js.publish("harness.one", b"kept")
        assert ack.seq == 1
    finally:
        await nc.close()
    await asyncio.to_thread(server.kill)
    await asyncio.to_thread(server.start)
    nc = await nats_py.connect(server.url, connect_timeout=5, allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info("HARNESS")
        assert info.state.messages == 1
    finally:
        await nc.close()


async def test_a_node_process_welcomes_dies_by_sigkill_and_comes_back_on_its_port(
    start_node_process: StartNodeProcess, tls_files: object
) -> None:
    # A plain server (no --cluster): the harness, not the cluster, is under test here.
    node = await start_node_process("plain", cluster=None)
    ca = str(tls_files.ca_pem)  # type: ignore[attr-defined]
    async with connect(node.address, ca=ca, name="alice", reconnect_base=0.05) as alice:
        pid = node.pid
        await asyncio.to_thread(node.kill)
        assert not node.running
        assert not await asyncio.to_thread(probe_welcome, "127.0.0.1", node.port, ca=ca, timeout=1)
        await asyncio.to_thread(node.start)
        assert node.pid != pid and node.starts == 2
        await alice.join("room", timeout=10)  # reconnected to the new process
