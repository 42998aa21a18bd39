"""The DTLS listener: the datagram channel of docs/protocol.md ("The datagram channel").

One UDP socket (``create_datagram_endpoint``) and, per peer, an :class:`Association`
holding a pyOpenSSL connection over memory BIOs. The stateless rules (cookies, the source
limit, the table's caps and timeouts, what a datagram may carry) are
:mod:`securemsg.core.datagram`'s; this driver owns the socket, the clock and the timers.

Datagram publishes are at most once: routed at once to the room's TLS members through
:meth:`Broker.publish_datagram` (which never pushes back) and to the room's datagram
members over their associations. Datagram members receive datagram publishes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import Counter
from typing import Any, Final, Protocol

import structlog
from OpenSSL import SSL

from securemsg.config import ServerConfig
from securemsg.core.datagram import (
    MAX_DATAGRAM_FRAME,
    MAX_UDP_PAYLOAD,
    AssociationTable,
    CookieJar,
    SourceLimiter,
    decode_datagram,
    hello_verify_request,
    parse_client_hello,
    peer_key,
)
from securemsg.core.delivery import message_prefix
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Bye,
    Delivery,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Join,
    Leave,
    Ping,
    Pong,
    Publish,
    ServerAck,
    Welcome,
    encode,
    encode_frame_of,
)
from securemsg.core.rooms import RoomRegistry
from securemsg.errors import ProtocolError, TLSConfigError
from securemsg.server.association import Association
from securemsg.server.broker import Broker
from securemsg.tls.dtls import describe_dtls_failure, server_dtls_context

__all__ = ["DatagramListener"]

logger = structlog.get_logger("securemsg.server.datagram")

#: How often handshake retransmissions and the timeouts are looked at, while there are
#: associations (an idle listener does not tick).
TICK_INTERVAL: Final = 0.05
_BYE_FRAME_OF = encode_frame_of
#: The bytes a ``seq`` below 2**53 and the closing brace add to a prefix.
_SEQ_ROOM: Final = 17


#: What the UDP socket may queue before the loop reads it: a burst of small datagrams costs
#: about 1 KB of kernel memory each, so the 208 KiB default drops a burst of about 250.
#: The kernel caps it at net.core.rmem_max.
RECEIVE_BUFFER: Final = 4 << 20


def _widen_receive_buffer(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


class DatagramHost(Protocol):
    config: ServerConfig
    broker: Broker
    #: The TLS side's context; a certificate reload replaces it (and ``config``).
    ssl_context: ssl.SSLContext


class DatagramListener(asyncio.DatagramProtocol):
    """The server's DTLS side; ``port`` once :meth:`start` returned."""

    def __init__(self, host: DatagramHost) -> None:
        config = host.config
        assert config.cert is not None
        self.host = host
        self.config = config
        self.broker = host.broker
        self.cookies = CookieJar()
        self.context = self._make_context(config)
        #: The TLS context the DTLS one was made beside: a reload replaces it.
        self._made_beside = host.ssl_context
        self.limiter = SourceLimiter(
            rate=config.datagram_source_rate, burst=config.datagram_source_rate
        )
        self.table: AssociationTable[Association] = AssociationTable(
            max_associations=config.max_associations,
            handshake_timeout=config.datagram_handshake_timeout,
            idle_timeout=config.datagram_idle_timeout,
        )
        self.rooms: RoomRegistry[Association] = RoomRegistry()
        self.by_name: dict[str, Association] = {}
        self.counts: Counter[str] = Counter()
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._refused_logged = 0.0
        #: Done once the socket is closed (connection_lost).
        self._lost: asyncio.Future[None] | None = None

    def _make_context(self, config: ServerConfig) -> SSL.Context:
        assert config.cert is not None
        return server_dtls_context(
            cert=config.cert,
            key=config.key,
            ca=config.ca,
            require_client_cert=config.require_client_cert,
            cookie=self._cookie,
            cookie_valid=self._cookie_valid,
        )

    def _current_context(self) -> SSL.Context:
        """The context of new handshakes: rebuilt when a certificate reload (SIGHUP, the
        files changing) gave the server a new configuration; open associations keep
        theirs."""
        if self.host.ssl_context is not self._made_beside:
            self._made_beside = self.host.ssl_context
            try:
                self.context = self._make_context(self.host.config)
            except TLSConfigError as exc:
                logger.error(
                    "certificate_reload_failed", error=str(exc), kept="the old certificate"
                )
        return self.context

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self._transport = transport
        _widen_receive_buffer(transport)
        self.port = transport.get_extra_info("sockname")[1]
        logger.info(
            "datagram_listening",
            host=host,
            port=self.port,
            max_associations=self.table.max_associations,
            max_datagram_frame=MAX_DATAGRAM_FRAME,
        )
        return self.port

    async def close(self) -> None:
        """Say ``bye`` to every association and close the socket; returns once it is
        closed, so the port can be bound again at once (a restart in the same process)."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        bye = _BYE_FRAME_OF(Bye(reason="server_shutdown"))
        for association in self.table.values():
            if association.established:
                association.send_frame(bye)
                association.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            if self._lost is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._lost), 1.0)
        logger.info("datagram_stopped", associations=len(self.table), **self.counts)

    def _send(self, datagram: bytes, address: tuple[str, int]) -> None:
        if self._transport is not None:
            self.counts["datagrams_out"] += 1
            self._transport.sendto(datagram, address)

    # -- cookies (OpenSSL calls these with the peer in the connection's app data) -------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _cookie(self, conn: SSL.Connection) -> bytes:
        return self.cookies.cookie(conn.get_app_data(), self._now())

    def _cookie_valid(self, conn: SSL.Connection, cookie: bytes) -> bool:
        return self.cookies.valid(conn.get_app_data(), cookie, self._now())

    # -- datagrams ----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.counts["datagrams_in"] += 1
        address = (str(addr[0]), int(addr[1]))
        key = peer_key(*address)
        association = self.table.get(key)
        if association is None:
            self._stranger(data, address, key)
        elif not association.established:
            association.conn.bio_write(data)
            self._handshake(association)
            if association.established:
                self._records(association, b"")  # application data may have come along
        elif data[:1] == b"\x16" and parse_client_hello(data) is not None:
            # A new handshake from an associated address: the peer restarted on the same
            # port (RFC 6347, 4.2.8). Only a valid cookie replaces the old association.
            self._new_handshake(association, data, address, key)
        else:
            self._records(association, data)

    def _new_handshake(
        self, association: Association, data: bytes, address: tuple[str, int], key: bytes
    ) -> None:
        hello = parse_client_hello(data)
        if hello is not None and hello.random == association.hello_random:
            # The ClientHello that opened this association, resent by the client's timer and
            # delayed or reordered on the way: ending the association for it would strand a
            # client that already finished its handshake.
            self.counts["hello_retransmissions"] += 1
            return
        if hello is not None and self.cookies.valid(key, hello.cookie, self._now()):
            # No close_notify: it would go to the new handshake's peer.
            self._end(association, "new_handshake", notify=False)
        self._stranger(data, address, key)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the association times out on its own.
        self.counts["socket_errors"] += 1

    def _stranger(self, data: bytes, address: tuple[str, int], key: bytes) -> None:
        """A datagram from an address without an association: the stateless path."""
        now = self._now()
        if not self.limiter.allow(address[0], now):
            self.counts["rate_limited"] += 1
            return
        hello = parse_client_hello(data)
        if hello is None:
            self.counts["dropped"] += 1
            return
        if not self.cookies.valid(key, hello.cookie, now):
            answer = hello_verify_request(hello, self.cookies.cookie(key, now))
            if answer is not None:
                self.counts["cookies_sent"] += 1
                self._send(answer, address)
            return
        if len(self.table) >= self.table.max_associations:
            self.counts["refused_max_associations"] += 1
            if now - self._refused_logged >= 1.0:  # one line a second, however many
                self._refused_logged = now
                logger.warning(
                    "datagram_refused",
                    peer=f"{address[0]}:{address[1]}",
                    reason="max_associations",
                    max_associations=self.table.max_associations,
                )
            return
        conn = SSL.Connection(self._current_context(), None)
        conn.set_app_data(key)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(MAX_UDP_PAYLOAD)
        conn.bio_write(data)
        try:
            conn.DTLSv1_listen()
        except SSL.Error:
            self.counts["dropped"] += 1
            return
        association = Association(
            conn, address=address, key=key, send=self._send, now=now, hello_random=hello.random
        )
        self.table.add(key, association, now)
        if self._tick is None and self._loop is not None:  # the timeouts start being looked at
            self._tick = self._loop.call_later(TICK_INTERVAL, self._on_tick)
        self._handshake(association)

    def _handshake(self, association: Association) -> None:
        try:
            done = association.handshake()
        except SSL.Error as exc:
            self.table.remove(association.key)
            self.counts["handshake_failed"] += 1
            logger.warning(
                "datagram_handshake_failed",
                peer=association.peer,
                reason=describe_dtls_failure(exc),
            )
            return
        if done:
            self.table.established(association.key, self._now())
            self.counts["associations_opened"] += 1
            logger.info(
                "datagram_association_opened",
                peer=association.peer,
                identity=association.identity,
                cipher=association.conn.get_cipher_name(),
            )

    def _records(self, association: Association, data: bytes) -> None:
        try:
            frames = association.receive(data)
        except SSL.ZeroReturnError:
            self._end(association, "close_notify")
            return
        except SSL.Error:
            self._end(association, "dtls_error")
            return
        for frame in frames:
            self._frame(association, frame)

    # -- frames -------------------------------------------------------------------------------

    def _frame(self, association: Association, data: bytes) -> None:
        try:
            message = decode_datagram(data, max_depth=self.config.max_depth)
        except ProtocolError as exc:
            self.counts["invalid_frames"] += 1
            self._error(association, exc.code, exc.message, exc.ref)
            return
        now = self._now()
        self.table.touch(association.key, now)
        if isinstance(message, Hello):
            self._hello(association, message)
        elif association.name is None:
            self._error(association, ErrorCode.BAD_MESSAGE, "the first message must be 'hello'")
        elif isinstance(message, Publish):
            self._publish(association, message, now)
        elif isinstance(message, Join):
            self._join(association, message)
        elif isinstance(message, Leave):
            self._leave(association, message)
        elif isinstance(message, Ping):
            association.send_frame(encode_frame_of(Pong(id=message.id)))
        elif isinstance(message, Bye):
            association.send_frame(encode_frame_of(Bye(reason="client_bye")))
            self._end(association, "client_bye")

    def _error(
        self, association: Association, code: str, text: str, ref: str | None = None
    ) -> None:
        association.send_frame(encode_frame_of(Error(code=code, message=text, ref=ref)))

    def _hello(self, association: Association, hello: Hello) -> None:
        try:
            name = self.broker.policy.admit(hello, identity=association.identity)
        except ProtocolError as exc:
            self._error(association, exc.code, exc.message)
            self._end(association, exc.code)
            return
        if association.name is not None and association.name != name:
            self._error(association, ErrorCode.BAD_MESSAGE, "a second 'hello' with another name")
            return
        holder = self.by_name.get(name)
        if holder is not None and holder is not association:
            # The newer association wins: a sensor that restarted comes back at once.
            self._error(holder, ErrorCode.SESSION_TAKEN_OVER, "the name is used by a newer one")
            self._end(holder, "taken_over")
        self.by_name[name] = association
        association.name = name
        idle = self.config.datagram_idle_timeout
        welcome = Welcome(
            version=min(hello.version, PROTOCOL_VERSION),
            session="",
            name=name,
            resumed=False,
            heartbeat=Heartbeat(interval=idle / 3, timeout=idle),
            max_frame=MAX_DATAGRAM_FRAME,
        )
        association.send_frame(encode_frame_of(welcome))

    def _join(self, association: Association, join: Join) -> None:
        if len(
            self.rooms.filters_of(association)
        ) >= self.config.max_subscriptions and join.room not in self.rooms.filters_of(association):
            self._error(association, ErrorCode.TOO_MANY_ROOMS, "too many rooms", join.id)
            return
        self.rooms.join(association, join.room)
        if join.id is not None:
            association.send_frame(encode_frame_of(ServerAck(ids=[join.id])))

    def _leave(self, association: Association, leave: Leave) -> None:
        if not self.rooms.leave(association, leave.room):
            self._error(association, ErrorCode.NOT_MEMBER, "not a member", leave.id)
        elif leave.id is not None:
            association.send_frame(encode_frame_of(ServerAck(ids=[leave.id])))

    def _publish(self, association: Association, publish: Publish, now: float) -> None:
        if not association.take_token(self.config.max_msgs_per_sec, now):
            self.counts["publishes_rate_limited"] += 1
            return
        assert association.name is not None
        self.counts["publishes"] += 1
        message = Delivery.of_publish(
            publish, sender=association.name, ts=time.time(), datagram=True
        )
        prefix = message_prefix(encode(message))
        # A TLS member reads frames up to max_frame: a tiny one (configured) misses it.
        if len(prefix) + _SEQ_ROOM <= self.config.max_frame:
            delivered, missed = self.broker.publish_datagram(prefix, publish.room)
            self.counts["delivered_tls"] += delivered
            self.counts["missed"] += missed
        for member in self.rooms.match(publish.room):
            if member is not association:
                member.deliver(prefix)
                self.counts["delivered_datagram"] += 1

    # -- ending -------------------------------------------------------------------------------

    def _end(self, association: Association, reason: str, *, notify: bool = True) -> None:
        self.table.remove(association.key)
        self.rooms.leave_all(association)
        if association.name is not None and self.by_name.get(association.name) is association:
            del self.by_name[association.name]
        if notify:
            association.close()
        self.counts["associations_closed"] += 1
        logger.info(
            "datagram_association_closed",
            peer=association.peer,
            name=association.name,
            reason=reason,
        )

    def _on_tick(self) -> None:
        assert self._loop is not None
        now = self._now()
        for _key, association, reason in self.table.expired(now):
            self.table.remove(association.key)
            self.rooms.leave_all(association)
            if association.name is not None and self.by_name.get(association.name) is association:
                del self.by_name[association.name]
            self.counts[reason] += 1
            if association.established:
                logger.info(
                    "datagram_association_closed",
                    peer=association.peer,
                    name=association.name,
                    reason=reason,
                )
        for association in self.table.handshaking():
            association.on_timer()
        # No association left: no tick (20 wake-ups a second of an idle server were this),
        # until the next one starts.
        self._tick = self._loop.call_later(TICK_INTERVAL, self._on_tick) if self.table else None
