"""One live client connection, and the edge where connect failures become securemsg errors.

Read path: bytes -> :class:`securemsg.core.connection.Client` -> events -> the owner (the
:class:`~securemsg.client.client.Client`) -> frames queued on the core -> one joined ``write`` per
event-loop iteration. The connection owns its transport and its heartbeat timer; what the
frames mean (the session's rules, the waiters) is the owner's business.

A connection is not *connected* until ``welcome`` arrives: under TLS 1.3 a server that
rejects our client certificate lets the handshake finish and closes right after, so the
only sign is EOF before ``welcome``. Events that arrive after ``welcome`` and before the
owner attaches (a resumed session's replay, in the same read) are kept and handed over on
:meth:`ClientConnection.attach`, so the owner can reset its state first.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import ssl
import weakref
from typing import Final, Protocol, cast

import structlog

from securemsg._compiled import mypyc_attr
from securemsg.busypoll import BusyPoll
from securemsg.config import ClientConfig
from securemsg.core import connection as protocol
from securemsg.core.address import Address
from securemsg.core.connection import ConnectionState, Event, FrameRejected, MessageReceived
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Bye,
    Error,
    ErrorCode,
    Hello,
    Message,
    Welcome,
)
from securemsg.core.readbuffer import read_buffer
from securemsg.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    ProtocolError,
    RejectedError,
    SecureMsgError,
    TLSError,
)
from securemsg.tls.contexts import (
    ResumingContext,
    certificate_names,
    client_context,
    is_hostname_mismatch,
    translate_client_error,
)

__all__ = [
    "ClientConnection",
    "ConnectionOwner",
    "HandshakeClosedError",
    "connect_error",
    "open_connection",
    "should_retry",
]

_AUTH_CODES: Final = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.NAME_TAKEN})
#: What a connect attempt may fail with; anything else is a bug and propagates as it is.
_CONNECT_FAILURES: Final = (OSError, EOFError, builtins.TimeoutError, ProtocolError, RejectedError)
_RESET_AT_CONNECT: Final = "the server reset the connection (it may be at its connection limit)"


class ConnectionOwner(Protocol):
    #: True when :meth:`queue_ack` may have an ``ack`` to queue: checked on every write.
    ack_wanted: bool

    def queue_ack(self, conn: ClientConnection) -> None:
        """About to write on ``conn``: queue the cumulative ``ack`` that is due, if any."""

    def events_received(self, conn: ClientConnection, events: list[Event]) -> None:
        """Act on what arrived; queue replies on ``conn``. Called once per read."""

    def connection_closed(self, conn: ClientConnection, reason: str) -> None:
        """``conn`` is gone; stop sending on it."""


# A Python class in the optional compiled build: mypyc cannot subclass EOFError.
@mypyc_attr(native_class=False)
class HandshakeClosedError(EOFError):
    """The server ended the connection before ``welcome`` (EOF, or a ``bye``)."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "eof")
        self.reason = reason


#: One busy poller per loop and window: the clients of one process spin together, once.
_busy_polls: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, BusyPoll]] = (
    weakref.WeakKeyDictionary()
)


def busy_poll_of(loop: asyncio.AbstractEventLoop, busy_poll_us: int) -> BusyPoll | None:
    """The busy poller the clients on ``loop`` with this ``busy_poll_us`` share (None: 0)."""
    if not busy_poll_us:
        return None
    polls = _busy_polls.setdefault(loop, {})
    poll = polls.get(busy_poll_us)
    if poll is None:
        poll = polls[busy_poll_us] = BusyPoll(loop, busy_poll_us / 1e6)
    return poll


class ClientConnection(asyncio.BufferedProtocol):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, hello: Hello, *, busy_poll_us: int = 0
    ) -> None:
        self._loop = loop
        self._hello = hello
        #: Keeps the loop polling for a moment after messages came (see securemsg.busypoll):
        #: a reply to what the application sends next then needs no wake-up.
        self.busy_poll = busy_poll_of(loop, busy_poll_us)
        self.core = protocol.Client(now=loop.time())
        self.transport: asyncio.Transport | None = None
        self.welcomed: asyncio.Future[Welcome] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        #: Why the connection ended, as soon as we know (a fatal error code, a bye reason).
        self.reason: str | None = None
        self._owner: ConnectionOwner | None = None
        self._early: list[Event] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._log = structlog.get_logger("securemsg.client.client")
        self._read_buffer = read_buffer()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.core.hello(self._hello)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out at once: the next read, on any connection of this thread, overwrites it.
        self.data_received(self._read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        core = self.core
        events = core.receive_data(data, self._loop.time())
        if not self.welcomed.done():
            events = self._handshake(events)
        if events:
            if self._owner is not None:
                self._owner.events_received(self, events)
            else:
                self._early.extend(events)
        if core.state is not ConnectionState.CLOSING and _delivers(events):
            if self.busy_poll is not None:
                self.busy_poll.touch()
            # Messages went to the application, which may answer them in this loop
            # iteration: flush after it, so the cumulative ack and the reply share one write.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
            return
        self._flush()
        if core.state is ConnectionState.CLOSING:
            self.abort(core.close_code or "protocol_error")

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.connection_lost()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.reason is None:
            self.reason = "eof" if exc is None else _describe(exc)
        if not self.welcomed.done():
            self.welcomed.set_exception(exc if exc is not None else HandshakeClosedError())
            self.welcomed.exception()  # retrieved here: nobody may be waiting any more
        if not self.closed.done():
            self.closed.set_result(self.reason)
        if self._owner is not None:
            self._owner.connection_closed(self, self.reason)

    # -- for the owner ------------------------------------------------------------------------

    def attach(self, owner: ConnectionOwner, *, interval: float, timeout: float) -> None:
        """Start delivering events to ``owner`` (first those that came with ``welcome``)."""
        self.core.set_heartbeat(interval=interval, timeout=timeout)
        self._owner = owner
        if self._early:
            early, self._early = self._early, []
            owner.events_received(self, early)
        self._arm_timer()
        self._flush()

    def send_frame(self, frame: bytes) -> None:
        """Queue one whole frame; every frame queued in this loop iteration goes in one write."""
        self.core.send_frame(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_relayed_payload(self, payload: bytes) -> None:
        """Queue the payload of a ``publish`` or ``direct``: consecutive ones may leave as one
        ``batch`` frame (protocol 3)."""
        self.core.send_relayed_payload(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush_soon(self) -> None:
        """Write what is queued (and the owner's ``ack``) once this loop iteration ends."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def ping(self) -> None:
        """Ping now (with whatever else is queued): the server's held acks come back with
        the pong instead of up to ACK_DELAY later."""
        self.core.ping(self._loop.time())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused:
            self._reading_paused = False
            # Silence while we were not reading was ours, not the server's.
            self.core.last_received = self._loop.time()
            self.transport.resume_reading()

    def say_bye(self, reason: str = "client_closed", *, end_session: bool = True) -> None:
        """End the session (no resume) and close once the bye is written. Without
        ``end_session`` close without a bye: the server keeps the session to be resumed
        (a client with a session file)."""
        if self.transport is None or self.transport.is_closing():
            return
        self.reason = self.reason or reason
        if end_session:
            self.core.send_bye(reason)
        self._flush()
        self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection now, without waiting for buffered data (a dead peer reads
        nothing, so a graceful close could wait forever)."""
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.abort()

    # -- internals ----------------------------------------------------------------------------

    def _handshake(self, events: list[Event]) -> list[Event]:
        """Settle ``welcomed`` from the first meaningful event; return the events after it."""
        for index, event in enumerate(events):
            if type(event) is FrameRejected:
                self._refuse(event.error)
                return []
            if type(event) is not MessageReceived:
                continue
            message = event.message
            if type(message) is Welcome:
                self.welcomed.set_result(message)
                return events[index + 1 :]
            if type(message) is Error:
                self._refuse(RejectedError(message.code, message.message))
                return []
            if type(message) is Bye:
                self._refuse(HandshakeClosedError(message.reason))
                return []
        return []

    def _refuse(self, error: Exception) -> None:
        self.welcomed.set_exception(error)
        self.welcomed.exception()
        self.abort(getattr(error, "code", None) or "refused")

    def _flush(self) -> None:
        self._flush_scheduled = False
        owner = self._owner
        if owner is not None and owner.ack_wanted:
            owner.queue_ack(self)
        data = self.core.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            # Joined: the SSL transports make one TLS record per writelines item.
            transport.write(data[0] if len(data) == 1 else b"".join(data))

    def _arm_timer(self) -> None:
        if self.core.state is ConnectionState.OPEN:
            when = max(self.core.next_deadline(), self._loop.time() + 0.001)
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._reading_paused:
            self.core.last_received = now  # we are not reading, so we cannot judge the server
        for event in self.core.tick(now):
            if type(event) is protocol.PeerTimedOut:
                self._log.warning("heartbeat_timeout", silence=round(event.silence, 3))
                self.abort(ErrorCode.HEARTBEAT_TIMEOUT)
                return
        self._flush()
        self._arm_timer()


async def open_connection(
    config: ClientConfig,
    *,
    session: str | None,
    last_seq: int,
    context: ssl.SSLContext | None = None,
    address: Address | None = None,
) -> ClientConnection:
    """Connect to ``address`` (by default ``config.host:config.port``), finish TLS and get
    ``welcome`` within ``connect_timeout``.

    Raises :class:`ConnectError` (or a subclass) from :func:`connect_error`, or
    :class:`~securemsg.errors.TLSConfigError` for unusable certificate files.
    """
    loop = asyncio.get_running_loop()
    hello = Hello(
        version=PROTOCOL_VERSION,
        name=config.name,
        token=config.token,
        session=session,
        last_seq=last_seq if session is not None else None,
    )
    if context is None:
        context = client_context(ca=config.ca, cert=config.cert, key=config.key)
    host, port = address or Address(config.host, config.port)
    conn: ClientConnection | None = None
    try:
        async with asyncio.timeout(config.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: ClientConnection(loop, hello, busy_poll_us=config.busy_poll_us),
                host,
                port,
                ssl=context,
                server_hostname=host,
                ssl_handshake_timeout=config.connect_timeout,
            )
            await conn.welcomed
    except _CONNECT_FAILURES as exc:
        if conn is not None:
            conn.abort("connect_failed")
        where = Address(host, port)
        names = await _names_held(config, where) if is_hostname_mismatch(exc) else []
        raise connect_error(exc, config, names=names, address=where) from exc
    except BaseException:  # cancelled, or a bug: no translation
        if conn is not None:
            conn.abort("cancelled")
        raise
    if isinstance(context, ResumingContext) and conn.transport is not None:
        # The server's session tickets came before its welcome: offer one next time.
        context.remember(conn.transport.get_extra_info("ssl_object"), host=config.host)
    return conn


async def _names_held(config: ClientConfig, address: Address) -> list[str]:
    """The names in the certificate of a server that failed the host-name check, read over
    a second handshake that checks the chain but not the name (best effort: [] if that
    fails too). Only for the error message: nothing is sent on that connection."""
    loop = asyncio.get_running_loop()
    try:
        context = client_context(ca=config.ca, cert=config.cert, key=config.key)
        context.check_hostname = False
        async with asyncio.timeout(config.connect_timeout):
            transport, _ = await loop.create_connection(
                asyncio.Protocol, address.host, address.port, ssl=context
            )
    except (OSError, SecureMsgError, builtins.TimeoutError):
        return []
    try:
        return certificate_names(transport.get_extra_info("peercert"))
    finally:
        transport.abort()


def connect_error(
    exc: Exception,
    config: ClientConfig,
    *,
    names: list[str] | None = None,
    address: Address | None = None,
) -> ConnectError:
    """The one place where a failed connect becomes a securemsg error, with one sentence that
    names the server at ``address`` (by default ``config.host:config.port``; for a host-name
    mismatch, the ``names`` its certificate holds).
    Certificates first: ``ssl.SSLError`` is an ``OSError``."""
    host, port = address or Address(config.host, config.port)
    where = f"{host}:{port}"
    mutual = config.cert is not None
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        return translate_client_error(
            exc, host=host, ca=config.ca, mutual=mutual, names=names or ()
        )
    if isinstance(exc, HandshakeClosedError | ssl.SSLEOFError):
        if isinstance(exc, HandshakeClosedError) and exc.reason is not None:
            return ConnectError(f"the server at {where} said bye before welcome ({exc.reason})")
        text = f"the server at {where} closed the connection before welcome"
        if mutual:
            return TLSError(
                f"{text}; under mutual TLS this usually means it rejected the client "
                "certificate (check --cert/--key)",
                check="client_certificate",
            )
        return ConnectError(f"{text}; if it requires client certificates, pass --cert and --key")
    if isinstance(exc, RejectedError):
        if exc.code in _AUTH_CODES:
            return AuthError(f"the server at {where} refused us: {exc.message}", code=exc.code)
        return ConnectError(f"the server at {where} refused the hello: {exc.message}")
    if isinstance(exc, ProtocolError):
        return ConnectError(f"the server at {where} broke the protocol: {exc.message}")
    if isinstance(exc, builtins.TimeoutError):
        return ConnectError(
            f"could not connect to {where} within {config.connect_timeout:g} s "
            "(TCP, TLS and welcome)"
        )
    if isinstance(exc, ConnectionResetError):
        # A server at its max_connections closes at accept, before TLS: a reset when our
        # ClientHello was in by then (its errno says "reset by peer"), a close otherwise.
        return ConnectError(f"could not connect to {where}: {_RESET_AT_CONNECT}")
    if isinstance(exc, OSError):
        return ConnectError(f"could not connect to {where}: {_describe(exc)}")
    return ConnectError(f"could not connect to {where}: {exc!r}")


def should_retry(error: SecureMsgError, *, welcomed: bool) -> bool:
    """Try again after ``error``? Network failures always. Certificate, authorization and
    configuration failures only once a session was welcomed: then they are likely passing
    (certificates get rotated, a server comes back with its old settings)."""
    if isinstance(error, TLSError | AuthError | ConfigError):
        return welcomed
    return True


def _delivers(events: list[Event]) -> bool:
    """True when ``events`` hold a message for the application (the last ones usually do)."""
    for event in reversed(events):
        if type(event) is MessageReceived and type(event.message) is Message:
            return True
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and (exc.errno == errno.ECONNREFUSED or "[Errno 111]" in str(exc))
    ):
        return "connection refused (is the server running on that port?)"
    if isinstance(exc, ConnectionResetError) and not exc.strerror:
        # What a server at its max_connections does: close at accept, before TLS.
        return _RESET_AT_CONNECT
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__
