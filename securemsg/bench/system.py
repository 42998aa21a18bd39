"""securemsg as the system under test of ``securemsg bench``: the ordinary
:class:`~securemsg.client.client.Client` behind the small interface of
:mod:`securemsg.bench.scenarios` (acks, sequence numbers, outbox and heartbeats stay on)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections.abc import Sequence

from securemsg.bench.scenarios import Handler
from securemsg.client.client import Client, ClientState, connect
from securemsg.client.connection import open_connection
from securemsg.config import ClientConfig
from securemsg.tls.contexts import client_context

__all__ = ["SecureMsgEndpoint", "SecureMsgSystem"]


class SecureMsgEndpoint:
    """One :class:`~securemsg.client.client.Client` as a benchmark endpoint."""

    def __init__(self, client: Client) -> None:
        self.client = client
        # Private on purpose: a reconnect that resumes the session is invisible otherwise.
        self._first_connection = client._mailbox.conn
        self._handlers: dict[str | None, Handler] = {}
        self._echo: set[str] = set()
        self._reader: asyncio.Task[None] | None = None

    async def subscribe(self, room: str, handler: Handler) -> None:
        self._handlers[room] = handler
        await self.client.join(room)
        self._start_reader()

    async def publish(self, room: str, payload: str) -> None:
        await self.client.publish(room, payload)

    async def serve_echo(self, room: str) -> None:
        self._echo.add(room)
        await self.client.join(room)
        self._start_reader()

    async def request(self, room: str, payload: str, timeout: float) -> str:
        reply = await self.client.request(room, payload, timeout)
        return str(reply.body)

    async def flush(self, timeout: float) -> None:
        await self.client.flush(timeout)

    def alive(self) -> bool:
        client = self.client
        return client.state is ClientState.CONNECTED and (
            client._mailbox.conn is self._first_connection
        )

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.client.close()

    def _start_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        handlers, echo, client = self._handlers, self._echo, self.client
        async for message in client:
            handler = handlers.get(message.room)
            if handler is not None:
                handler(message.body)
            elif message.room in echo and message.reply_to is not None:
                await client.reply(message, message.body)


class SecureMsgSystem:
    """A securemsg server at ``host:port``, trusted through ``ca``; or the nodes of a
    cluster at ``servers`` (``host:port`` each).

    With several servers each client is given all of them, starting at its *home* (the
    others are where it fails over to): ``home`` for every client when set (the unpaced
    workers: publishers at the first server, subscribers at the second), otherwise the
    servers in turn, one client after the other (paced runs).
    """

    name = "securemsg"
    body_overhead = 2  # a body is a JSON string: two quotes

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca: str | None,
        servers: Sequence[str] = (),
        home: int | None = None,
    ) -> None:
        self.host, self.port, self.ca = host, port, ca
        self.servers = list(servers)
        self._homes = itertools.repeat(home) if home is not None else itertools.count()
        self._context = client_context(ca=ca)
        self._handshakes = 0

    async def connect(self, name: str) -> SecureMsgEndpoint:
        servers = self.servers
        if len(servers) < 2:
            client = await connect(self.host, self.port, ca=self.ca, name=name)
        else:
            home = next(self._homes) % len(servers)
            ring = servers[home:] + servers[:home]
            client = await connect(ring, ca=self.ca, name=name)
        return SecureMsgEndpoint(client)

    def worker_argv(self) -> list[str]:
        """The command line of a worker process of an unpaced run (roles are appended)."""
        argv = [sys.executable, "-m", "securemsg.bench.worker", "--host", self.host]
        argv += ["--port", str(self.port)]
        if len(self.servers) > 1:
            argv += ["--servers", ",".join(self.servers)]
        return argv + (["--ca", self.ca] if self.ca else [])

    async def handshake(self) -> None:
        self._handshakes += 1
        config = ClientConfig(
            host=self.host, port=self.port, ca=self.ca, name=f"bench-hs-{self._handshakes}"
        )
        conn = await open_connection(config, session=None, last_seq=0, context=self._context)
        conn.say_bye()
        async with asyncio.timeout(config.connect_timeout):
            await asyncio.shield(conn.closed)
