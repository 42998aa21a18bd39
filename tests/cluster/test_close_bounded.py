"""A node's stop is bounded when NATS stops answering in the middle of it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from securemsg.config import ServerConfig
from securemsg.runner import CANCEL_GRACE
from securemsg.server.server import Server
from tests.cluster.conftest import NATS_SERVER, NatsServer
from tests.integration.conftest import server_options

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed")


async def test_a_node_whose_nats_stopped_answering_closes_within_its_request_timeout(
    tmp_path: Any, tls_files: Any, unit: float
) -> None:
    """nats-py's drain() takes the first cancel and goes on to a flush of 10 s: the stop of a
    node whose NATS hung (here: SIGSTOP, the connection open, nothing answered) took 12 s."""
    nats = NatsServer(tmp_path / "js")
    nats.start()
    assert nats.process is not None
    timeout = 5 * unit
    options = server_options(tls_files, unit) | {
        "cluster": nats.url,
        "datagram_port": "off",
        "cluster_request_timeout": timeout,
    }
    node = Server(ServerConfig(**options))
    try:
        await node.start()
        os.kill(nats.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        async with asyncio.timeout(30):
            await node.close()
        took = time.monotonic() - started
    finally:
        os.kill(nats.process.pid, signal.SIGCONT)
        nats.stop()
    # The drain's deadline, then the cancels that end it (a second one a second later).
    assert took < timeout + CANCEL_GRACE
