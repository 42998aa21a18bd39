"""Fixtures for tests against real servers on 127.0.0.1 over TLS."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

from securemsg.client.client import Client, connect
from securemsg.config import ServerConfig
from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.core.messages import Hello, Ping, Pong, ServerMessage, decode_server, encode
from securemsg.server.server import Server
from securemsg.tls.contexts import client_context

StartServer = Callable[..., Awaitable[Server]]
OpenClient = Callable[..., Awaitable[Client]]


def pytest_configure(config: pytest.Config) -> None:
    """SECUREMSG_TEST_LOOP=uvloop runs the integration tests on uvloop, as the CLI does."""
    if os.environ.get("SECUREMSG_TEST_LOOP") == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def server_options(tls_files: Any, unit: float) -> dict[str, Any]:
    """A test server's settings: port 0, the test certificates, short timeouts."""
    return {
        "host": "127.0.0.1",
        "port": 0,
        "cert": str(tls_files.server_cert),
        "key": str(tls_files.server_key),
        "heartbeat_interval": 20 * unit,
        "heartbeat_timeout": 60 * unit,
        "handshake_timeout": 20 * unit,
        "shutdown_timeout": 10 * unit,
    }


@pytest.fixture
async def start_server(tls_files: Any, unit: float) -> AsyncIterator[StartServer]:
    """Start servers on port 0 with test certificates and short timeouts; closed at the end."""
    servers: list[Server] = []

    async def start(**overrides: Any) -> Server:
        options = server_options(tls_files, unit) | overrides
        server = Server(ServerConfig(**options))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


class RawClient:
    """A bare protocol client for server tests: sends structs or bytes, reads decoded frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(16 * 1024 * 1024)
        self.frames: list[ServerMessage] = []
        self.welcome: Any = None

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        ctx: ssl.SSLContext,
        host: str = "localhost",
    ) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host), 5
        )
        return cls(reader, writer)

    def send(self, *messages: msgspec.Struct) -> None:
        self.writer.write(b"".join(encode_frame(encode(m)) for m in messages))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0) -> ServerMessage:
        """The next frame that is not a ping (pings are answered)."""
        async with asyncio.timeout(timeout):
            while True:
                while not self.frames:
                    data = await self.reader.read(65536)
                    if not data:
                        raise EOFError("server closed the connection")
                    self.frames.extend(decode_server(f) for f in self.decoder.feed(data))
                frame = self.frames.pop(0)
                if isinstance(frame, Ping):
                    self.send(Pong(id=frame.id))
                    continue
                return frame

    async def recv_type(self, kind: type, timeout: float = 5.0) -> Any:
        """Skip frames until one of ``kind`` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if isinstance(frame, kind):
                    return frame

    async def closed(self, timeout: float = 5.0) -> bool:
        """Read until EOF; True when the server closed the connection."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except (ConnectionResetError, ssl.SSLError):
            return True
        return True

    async def hello(self, name: str | None, **fields: Any) -> Any:
        self.send(Hello(version=2, name=name, **fields))
        self.welcome = await self.recv()
        return self.welcome

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1)
        except (OSError, ssl.SSLError, TimeoutError):
            self.writer.transport.abort()  # e.g. a test paused reading: TLS close cannot finish
            await asyncio.sleep(0)


@pytest.fixture
async def raw(tls_files: Any) -> AsyncIterator[Callable[..., Awaitable[RawClient]]]:
    """Open raw protocol clients; all closed at the end."""
    clients: list[RawClient] = []

    async def open_client(
        port: int, name: str | None = None, *, ctx: ssl.SSLContext | None = None, **hello: Any
    ) -> RawClient:
        client = await RawClient.open(port, ctx=ctx or client_context(ca=tls_files.ca_pem))
        clients.append(client)
        if name is not None or hello:
            await client.hello(name, **hello)
        return client

    yield open_client
    for client in clients:
        await client.close()


@pytest.fixture
async def open_client(tls_files: Any, unit: float) -> AsyncIterator[OpenClient]:
    """Connect clients that trust the test CA and reconnect quickly; closed at the end."""
    clients: list[Client] = []

    async def open_(port: int, name: str | None, **options: Any) -> Client:
        options.setdefault("ca", str(tls_files.ca_pem))
        options.setdefault("reconnect_base", unit / 2)
        options.setdefault("reconnect_cap", 2 * unit)
        options.setdefault("connect_timeout", 20 * unit)
        client = await connect("localhost", port, name=name, **options)
        clients.append(client)
        return client

    yield open_
    await asyncio.gather(*(client.close(timeout=1) for client in clients))
