"""A connection from its TCP accept to the end of its TLS handshake.

The loop accepts (``loop.create_server`` on our listening sockets, in C) and hands each new
TCP transport an :class:`Incoming`. Before any TLS work it is counted against
``max_connections`` (one past it is closed at once), and its first bytes are classified:
plaintext, an HTTP request, or a ClientHello whose ALPN offers lack ``securemsg/1`` are
refused (HTTP with a ``400``). A ClientHello worth answering goes, with the transport, to a
:class:`~securemsg.server.tlstransport.TLSTransport` and its
:class:`~securemsg.server.connection.ServerConnection`. Everything until the handshake is
done, or has failed, runs under ``handshake_timeout`` on the server's timer wheel, and every
failure is logged with its reason. No task, no future of its own and no extra system call
per connection: this is the path of every new connection (server CPU per handshake is one of
issue 15's figures).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final, Protocol

import structlog

from securemsg.core.clienthello import (
    ClientHelloInfo,
    alpn_acceptable,
    inspect_client_hello,
    offers_securemsg,
)
from securemsg.server.connection import ConnectionHost, ServerConnection
from securemsg.server.tlstransport import TLSTransport
from securemsg.tls.contexts import describe_server_handshake_error

__all__ = ["AcceptHost", "Incoming"]

logger = structlog.get_logger("securemsg.server.incoming")

_HTTP_BODY: Final = b"This is a securemsg TLS port, not HTTP(S).\r\n"
_HTTP_REFUSAL: Final = (
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_HTTP_BODY), _HTTP_BODY)
)


class AcceptHost(ConnectionHost, Protocol):
    """What an incoming connection needs of the server (the server is one)."""

    ssl_context: ssl.SSLContext

    def next_connection_id(self) -> int: ...

    def admit(self, incoming: Incoming, peer: str) -> bool:
        """Count a new connection in, or refuse it (max_connections); True if admitted."""

    def handshake_ended(self, incoming: Incoming) -> None:
        """One handshake fewer in progress (done, failed or aborted)."""

    def handshake_failed(self, conn_id: int, peer: str, reason: str) -> None: ...

    def connection_opened(self, conn: ServerConnection) -> None: ...


class Incoming(asyncio.Protocol):
    """The protocol of an accepted TCP transport until TLS takes over (see the module doc)."""

    __slots__ = (
        "_accepted_at",
        "_conn",
        "_done",
        "_head",
        "_host",
        "_id",
        "_layer",
        "_peer",
        "_slot",
        "_tcp",
        "_timed_out",
    )

    def __init__(self, host: AcceptHost) -> None:
        self._host = host
        self._tcp: asyncio.Transport | None = None
        self._head = b""
        self._id = 0
        self._peer = ""
        self._accepted_at = 0.0
        self._slot: int | None = None
        self._conn: ServerConnection | None = None
        self._layer: TLSTransport | None = None
        self._timed_out = False
        self._done = False

    # -- before TLS: the TCP transport's protocol ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        host = self._host
        self._peer = _format_peer(tcp.get_extra_info("peername"))
        if not host.admit(self, self._peer):
            tcp.abort()
            return
        self._tcp = tcp
        self._id = host.next_connection_id()
        if host.logs_debug:
            logger.debug("connection_opened", conn=self._id, peer=self._peer)
        loop = host.loop
        self._accepted_at = loop.time()
        self._slot = host.wheel.schedule(self._accepted_at + host.config.handshake_timeout, self)

    def data_received(self, data: bytes) -> None:
        head = self._head + data if self._head else data
        if offers_securemsg(head):  # our clients: no need to walk the ClientHello
            self._head = b""
            self._start_tls(head)
            return
        info = inspect_client_hello(head)
        if info is None:  # more to come (bounded: a full ClientHello always has an answer)
            self._head = head
            return
        self._head = b""
        reason = _refusal(info)
        if reason is not None:
            self._refuse(reason, http=info.kind == "http")
        else:
            self._start_tls(head)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost says why

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tcp is not None:  # before a ClientHello came (TLS has the transport after)
            self._tcp = None
            error = exc or EOFError("the client closed before sending a ClientHello")
            self._end(describe_server_handshake_error(error))

    def abort(self) -> None:
        """Drop the connection, unlogged (the server is stopping)."""
        if self._finish():
            holder = self._layer or self._tcp
            if holder is not None:
                holder.abort()

    # -- the deadline (the server's timer wheel) ----------------------------------------------

    def on_timer(self) -> None:
        self._slot = None
        self._timed_out = True
        if self._layer is not None:
            self._layer.abort()  # the handshake callback logs the failure as a timeout
        elif self._tcp is not None:
            tcp, self._tcp = self._tcp, None
            tcp.abort()
            self._end("timeout")

    # -- TLS ----------------------------------------------------------------------------------

    def _start_tls(self, head: bytes) -> None:
        host, tcp = self._host, self._tcp
        assert tcp is not None
        conn = ServerConnection(
            host, conn_id=self._id, peer=self._peer, accepted_at=self._accepted_at
        )
        layer = TLSTransport(host.loop, host.ssl_context, conn)
        self._conn, self._layer, self._tcp = conn, layer, None
        layer.when_handshaken(self._handshaken)
        tcp.set_protocol(layer)
        layer.connection_made(tcp)
        layer.feed(head)

    def _handshaken(self, exc: BaseException | None) -> None:
        conn, layer = self._conn, self._layer
        assert conn is not None and layer is not None
        if not self._finish():
            return  # aborted: the server is stopping
        if exc is None:
            self._host.connection_opened(conn)
            return
        layer.abort()
        reason = "timeout" if self._timed_out else describe_server_handshake_error(exc)
        self._host.handshake_failed(self._id, self._peer, reason)

    # -- ending before TLS --------------------------------------------------------------------

    def _refuse(self, reason: str, *, http: bool) -> None:
        tcp, self._tcp = self._tcp, None
        assert tcp is not None
        if http:
            tcp.write(_HTTP_REFUSAL)
        tcp.close()  # after the answer; what the client sent was read, so no reset
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self._finish():
            self._host.handshake_failed(self._id, self._peer, reason)

    def _finish(self) -> bool:
        """Give the connection's place back, once; False when it was given back already."""
        if self._done:
            return False
        self._done = True
        self._cancel_deadline()
        self._host.handshake_ended(self)
        return True

    def _cancel_deadline(self) -> None:
        if self._slot is not None:
            self._host.wheel.cancel(self._slot, self)
            self._slot = None


def _refusal(info: ClientHelloInfo) -> str | None:
    if info.kind == "http":
        return "http_request"
    if info.kind == "plaintext":
        return "plaintext"
    if not alpn_acceptable(info):
        return "alpn_mismatch"
    return None


def _format_peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
