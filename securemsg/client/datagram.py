"""The datagram client: securemsg over DTLS 1.2, for telemetry where the latest value beats
a late one (docs/protocol.md, "The datagram channel").

::

    client = await securemsg.datagram.connect("localhost", 7443, ca="ca.pem", name="probe-7")
    await client.publish("sensors.kitchen.temp", {"c": 21.5})   # at most once, no ack
    await client.join("sensors.>")                               # acknowledged (retried)
    async for message in client:                                 # datagram messages only
        print(message.sender, message.body, message.seq)
    await client.close()

Nothing is resent but the handshake (by DTLS's own timers), ``hello``, ``join`` and
``leave`` (idempotent, retried until answered). Received messages wait in a bounded queue;
when the application falls behind the oldest are dropped and counted (:attr:`dropped`).
``message.seq`` counts the datagram messages of this association: a gap is a loss.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final

from OpenSSL import SSL

from securemsg.core.datagram import (
    MAX_DATAGRAM_FRAME,
    MAX_UDP_PAYLOAD,
    pack_datagrams,
    split_records,
)
from securemsg.core.frames import encode_frame
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Bye,
    Error,
    ErrorCode,
    Hello,
    Join,
    Leave,
    Message,
    Ping,
    Pong,
    Publish,
    ServerAck,
    Welcome,
    decode_at_client,
    encode,
    encode_body,
    is_valid_room,
    is_valid_room_filter,
)
from securemsg.errors import (
    AuthError,
    ClosedError,
    ConnectError,
    ProtocolError,
    RejectedError,
    SecureMsgError,
    TimeoutError,
)
from securemsg.tls.dtls import PeerCheck, client_dtls_context, translate_dtls_client_error

__all__ = ["DatagramClient", "connect"]

#: Seconds between two sends of a request that waits for its answer (hello, join, leave).
RETRY_INTERVAL: Final = 0.25
MAX_RECEIVED: Final = 10_000
#: The UDP socket's receive buffer (capped by the kernel at net.core.rmem_max).
RECEIVE_BUFFER: Final = 1 << 20
_AUTH_CODES: Final = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.NAME_TAKEN})
_FATAL: Final = frozenset(
    {ErrorCode.UNAUTHORIZED, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.SESSION_TAKEN_OVER}
)


async def connect(
    host: str,
    port: int = 7443,
    *,
    ca: str | None = None,
    name: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    local_address: tuple[str, int] | None = None,
) -> DatagramClient:
    """Open a DTLS association with the server and say ``hello``; :class:`TLSError` when
    the handshake fails (``check`` says which verification), :class:`AuthError` when the
    server refuses the name, :class:`TimeoutError` when nothing answers within ``timeout``.
    ``local_address`` binds the client's socket (a fixed source port, for a firewall)."""
    check = PeerCheck(host=host)
    context = client_dtls_context(ca=ca, cert=cert, key=key, check=check)
    client = DatagramClient(host, port, local_address=local_address)
    try:
        async with asyncio.timeout(timeout):
            await client._open(context, check=check, ca=ca, mutual=cert is not None)
            await client._hello(name=name, token=token)
    except builtins.TimeoutError as exc:
        client._abort()
        raise TimeoutError(f"no DTLS answer from {host}:{port} (UDP) within {timeout:g} s") from exc
    except BaseException:
        client._abort()
        raise
    return client


class DatagramClient(asyncio.DatagramProtocol):
    """One DTLS association; use :func:`connect`. Safe to use from one event loop."""

    def __init__(
        self, host: str, port: int, *, local_address: tuple[str, int] | None = None
    ) -> None:
        self.host, self.port = host, port
        self.local_address = local_address
        self.name = ""
        #: Messages dropped because the application did not take them in time.
        self.dropped = 0
        #: Valid datagrams received, and frames that failed to decode.
        self.received = 0
        self.invalid = 0
        self.handshake_time = 0.0
        self._handshaken = False
        self._conn: SSL.Connection | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._messages: deque[Message] = deque(maxlen=MAX_RECEIVED)
        self._arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._welcome: asyncio.Future[Welcome] = self._loop.create_future()
        self._ids = itertools.count(1)
        self._closed: SecureMsgError | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._last_received = self._loop.time()
        self._closed_by_us = False

    # -- opening ------------------------------------------------------------------------------

    async def _open(
        self, context: SSL.Context, *, check: PeerCheck, ca: str | None, mutual: bool
    ) -> None:
        loop = self._loop
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self, remote_addr=(self.host, self.port), local_addr=self.local_address
            )
        except OSError as exc:
            raise ConnectError(f"cannot reach {self.host}:{self.port} (UDP): {exc}") from exc
        sock = self._transport.get_extra_info("socket")
        if sock is not None:  # a burst of messages must not overflow the kernel's queue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        conn = self._conn = SSL.Connection(context, None)
        conn.set_connect_state()
        conn.set_tlsext_host_name(self.host.encode("idna"))
        conn.set_ciphertext_mtu(MAX_UDP_PAYLOAD)
        started = loop.time()
        while True:
            self._wake.clear()
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                self._flush()
            except SSL.Error as exc:
                self._flush()
                raise translate_dtls_client_error(
                    exc, host=self.host, ca=ca, mutual=mutual, check=check
                ) from None
            if self._closed is not None:
                raise ConnectError(f"cannot reach {self.host}:{self.port} (UDP): {self._closed}")
            wait = conn.DTLSv1_get_timeout()
            with contextlib.suppress(builtins.TimeoutError):
                async with asyncio.timeout(wait if wait is not None else 1.0):
                    await self._wake.wait()
            if not self._wake.is_set() and conn.DTLSv1_handle_timeout():
                self._flush()  # DTLS's own retransmission timer
        self._flush()
        self._handshaken = True
        self.handshake_time = loop.time() - started

    async def _hello(self, *, name: str | None, token: str | None) -> None:
        frame = encode_frame(encode(Hello(version=PROTOCOL_VERSION, name=name, token=token)))
        while not self._welcome.done():
            self._send_frame(frame)
            with contextlib.suppress(builtins.TimeoutError):
                async with asyncio.timeout(RETRY_INTERVAL):
                    await asyncio.shield(self._welcome)
        welcome = self._welcome.result()
        self.name = welcome.name
        self._keepalive = self._loop.create_task(
            self._keep_alive(welcome.heartbeat.interval, welcome.heartbeat.timeout)
        )

    # -- the API ------------------------------------------------------------------------------

    async def publish(self, room: str, body: Any, *, id: str | None = None) -> None:
        """Send one datagram publish: at most once, no acknowledgement. ``ValueError`` when
        it is larger than one datagram may carry."""
        self._check_open()
        if not isinstance(room, str) or not is_valid_room(room):
            raise ValueError(f"invalid room {room!r}")
        payload = encode(Publish(room=room, body=encode_body(body), id=id))
        if len(payload) > MAX_DATAGRAM_FRAME:
            raise ValueError(
                f"publish of {len(payload)} bytes is larger than a datagram carries"
                f" ({MAX_DATAGRAM_FRAME} bytes)"
            )
        self._send_frame(encode_frame(payload))

    async def join(self, room: str, *, timeout: float = 5.0) -> None:
        """Receive the datagram publishes of ``room`` (a filter); retried until answered."""
        await self._request(Join(room=room, id=f"j{next(self._ids)}"), timeout)

    async def leave(self, room: str, *, timeout: float = 5.0) -> None:
        await self._request(Leave(room=room, id=f"l{next(self._ids)}"), timeout)

    async def ping(self, *, timeout: float = 5.0) -> float:
        """One round trip, in seconds (a lost ping is sent again)."""
        started = self._loop.time()
        while True:
            self._check_open()
            ping_id = next(self._ids)
            future = self._pings[ping_id] = self._loop.create_future()
            self._send_frame(encode_frame(encode(Ping(id=ping_id))))
            try:
                async with asyncio.timeout(min(RETRY_INTERVAL, timeout)):
                    await future
                return self._loop.time() - started
            except builtins.TimeoutError:
                if self._loop.time() - started >= timeout:
                    raise TimeoutError(f"no pong within {timeout:g} s") from None
            finally:
                self._pings.pop(ping_id, None)

    async def receive(self, timeout: float | None = None) -> Message:
        """The next datagram message; :class:`ClosedError` once closed and empty."""
        try:
            async with asyncio.timeout(timeout):
                while not self._messages:
                    if self._closed is not None:
                        raise self._closed
                    self._arrived.clear()
                    await self._arrived.wait()
        except builtins.TimeoutError:
            raise TimeoutError(f"no datagram message within {timeout:g} s") from None
        return self._messages.popleft()

    async def __aiter__(self) -> AsyncIterator[Message]:
        """The messages until :meth:`close`; :class:`ClosedError` when the association
        ended otherwise (the server said ``bye``, or stopped answering)."""
        while True:
            try:
                yield await self.receive()
            except ClosedError:
                if self._closed_by_us:
                    return
                raise

    async def close(self) -> None:
        if self._closed is None:
            self._closed_by_us = True
        if self._closed is None and self._conn is not None:
            self._send_frame(encode_frame(encode(Bye())))
            with contextlib.suppress(SSL.Error):
                self._conn.shutdown()
            self._flush()
        self._abort()
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive

    async def __aenter__(self) -> DatagramClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    async def _request(self, message: Join | Leave, timeout: float) -> None:
        if not is_valid_room_filter(message.room):
            raise ValueError(f"invalid room filter {message.room!r}")
        assert message.id is not None
        future = self._waiters[message.id] = self._loop.create_future()
        frame = encode_frame(encode(message))
        try:
            async with asyncio.timeout(timeout):
                while not future.done():
                    self._check_open()
                    self._send_frame(frame)
                    with contextlib.suppress(builtins.TimeoutError):
                        async with asyncio.timeout(RETRY_INTERVAL):
                            await asyncio.shield(future)
        except builtins.TimeoutError:
            raise TimeoutError(
                f"no answer to {message.__struct_config__.tag} "
                f"{message.room!r} within {timeout:g} s"
            ) from None
        finally:
            self._waiters.pop(message.id, None)
        future.result()

    async def _keep_alive(self, interval: float, timeout: float) -> None:
        """Ping every ``interval`` (the server's idle timeout counts silence); close with
        :class:`ClosedError` when nothing came back for ``timeout`` (the server restarted
        or is gone: connect again)."""
        while self._closed is None:
            await asyncio.sleep(interval)
            silence = self._loop.time() - self._last_received
            if silence >= timeout:
                self._lost(ClosedError(f"no answer from the server for {silence:.0f} s"))
                return
            self._send_frame(encode_frame(encode(Ping(id=next(self._ids)))))

    def _send_frame(self, frame: bytes) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(SSL.Error):
            self._conn.send(frame)
        self._flush()

    def _flush(self) -> None:
        if self._conn is None or self._transport is None:
            return
        data = b""
        for _ in range(64):
            try:
                data += self._conn.bio_read(65536)
            except SSL.WantReadError:
                break
        for datagram in pack_datagrams(split_records(data)):
            self._transport.sendto(datagram)

    def _abort(self) -> None:
        if self._closed is None:
            self._closed = ClosedError("the datagram client is closed")
        self._arrived.set()
        for future in (*self._waiters.values(), *self._pings.values()):
            if not future.done():
                future.set_exception(self._closed)
        if not self._welcome.done():
            self._welcome.cancel()
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.DatagramProtocol -------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        conn = self._conn
        if conn is None:
            return
        self._wake.set()
        conn.bio_write(data)
        if not self._handshaken:
            return  # the handshake loop reads it
        for _ in range(16):
            try:
                plaintext = conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._lost(ClosedError("the server closed the datagram association"))
                break
            except SSL.Error:
                break
            self._frame(plaintext)
        self._flush()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nobody listens there (yet); the handshake keeps retrying.
        pass

    def _frame(self, data: bytes) -> None:
        try:
            message = decode_at_client(data[4:]) if len(data) > 4 else None
        except ProtocolError:
            message = None
        if message is None:
            self.invalid += 1
            return
        self.received += 1
        self._last_received = self._loop.time()
        if isinstance(message, Message):
            if len(self._messages) == self._messages.maxlen:
                self.dropped += 1
            self._messages.append(message)
            self._arrived.set()
        elif isinstance(message, Welcome):
            if not self._welcome.done():
                self._welcome.set_result(message)
        elif isinstance(message, ServerAck):
            for msg_id in message.ids:
                waiter = self._waiters.get(msg_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        elif isinstance(message, Pong):
            ping = self._pings.get(message.id)
            if ping is not None and not ping.done():
                ping.set_result(None)
        elif isinstance(message, Ping):
            self._send_frame(encode_frame(encode(Pong(id=message.id))))
        elif isinstance(message, Error):
            self._error(message)
        elif isinstance(message, Bye):
            reason = message.reason or "bye"
            self._lost(ClosedError(f"the server ended the datagram association ({reason})"))

    def _error(self, error: Error) -> None:
        waiter = self._waiters.get(error.ref or "")
        if waiter is not None and not waiter.done():
            waiter.set_exception(RejectedError(error.code, error.message, ids=(error.ref or "",)))
        if error.code in _AUTH_CODES and not self._welcome.done():
            self._welcome.set_exception(AuthError(error.message, code=error.code))
        elif error.code in _FATAL or not self._welcome.done():
            self._lost(ClosedError(f"the server closed the association: {error.message}"))
            if not self._welcome.done():
                self._welcome.set_exception(ConnectError(error.message))

    def _lost(self, error: SecureMsgError) -> None:
        if self._closed is None:
            self._closed = error
        self._abort()
