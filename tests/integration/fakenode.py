"""A raw TLS server that speaks just enough of the protocol to play a cluster node.

It records every ``hello``, answers it with a ``welcome`` carrying the session and the
``nodes`` it is told, acknowledges what it is sent, answers pings, and delivers or says
``bye`` when the test tells it to. Real TLS on 127.0.0.1, real frames: nothing is mocked,
the server side is just small enough to be written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

import msgspec

from securemsg.core.frames import FrameDecoder
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Delivery,
    Heartbeat,
    Hello,
    Ping,
    Pong,
    ServerAck,
    Welcome,
    decode_client,
    encode_frame_of,
)

__all__ = ["FakeNode"]


class FakeNode:
    """One fake node on a free port of 127.0.0.1 (``async with FakeNode(ctx) as node``)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        nodes: list[str] | None = None,
        session: str = "fake-session",
        resumed: bool = False,
    ) -> None:
        self.context = context
        self.nodes = nodes
        self.session = session
        self.resumed = resumed
        self.hellos: list[Hello] = []
        self.acked: list[int] = []
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.welcomed = asyncio.Event()

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    async def __aenter__(self) -> FakeNode:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=5
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    def send(self, message: msgspec.Struct) -> None:
        """To every connected client."""
        for writer in self._writers:
            if not writer.is_closing():
                writer.write(encode_frame_of(message))

    def deliver(self, seq: int, room: str, body: Any) -> None:
        raw = msgspec.Raw(msgspec.json.encode(body))
        self.send(Delivery(room=room, sender="someone", body=raw, ts=time.time(), seq=seq))

    def bye(self, reason: str) -> None:
        """Say bye to every client and close (as a node that lost the cluster does)."""
        self.send(Bye(reason=reason))
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        decoder = FrameDecoder(1 << 20)
        try:
            while data := await reader.read(65536):
                for payload in decoder.feed(data):
                    self._answer(decode_client(payload), writer)
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()

    def _answer(self, message: Any, writer: asyncio.StreamWriter) -> None:
        if isinstance(message, Hello):
            self.hellos.append(message)
            welcome = Welcome(
                version=PROTOCOL_VERSION,
                session=self.session,
                name=message.name or "anonymous",
                resumed=self.resumed,
                heartbeat=Heartbeat(interval=10.0, timeout=30.0),
                max_frame=1 << 20,
                nodes=self.nodes,
            )
            writer.write(encode_frame_of(welcome))
            self.welcomed.set()
        elif isinstance(message, Ping):
            writer.write(encode_frame_of(Pong(id=message.id)))
        elif isinstance(message, Ack):
            self.acked.append(message.seq)
        elif getattr(message, "id", None) is not None:
            writer.write(encode_frame_of(ServerAck(ids=[message.id])))
