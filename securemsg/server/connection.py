"""One client connection on the server: the asyncio driver of the sans-I/O core.

Read path: bytes -> :class:`securemsg.core.connection.Server` (framing, handshake,
heartbeat) -> events -> :class:`securemsg.core.server_session.ServerSession` (the session's
rules) -> the broker (routing) -> frames queued on this or other connections -> one joined
``write`` per connection per loop iteration. The driver owns the transport, its slot in the
server's timer wheel and the ack timer (armed at the session's ``ack_due_at``), and decides
nothing about the protocol.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Protocol, cast

import structlog
from structlog.typing import FilteringBoundLogger

from securemsg.busypoll import BusyPoll
from securemsg.config import ServerConfig
from securemsg.core import connection as protocol
from securemsg.core.connection import (
    BatchReceived,
    ConnectionState,
    FrameRejected,
    MessageReceived,
    PeerTimedOut,
)
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    ServerAck,
    Welcome,
)
from securemsg.core.readbuffer import read_buffer
from securemsg.core.server_session import (
    RELIEVED,
    Answered,
    Joined,
    Left,
    RequestRefused,
    ServerSession,
    SessionEvent,
)
from securemsg.errors import ProtocolError
from securemsg.server.broker import Broker, Link, Opened
from securemsg.server.timerwheel import TimerWheel
from securemsg.server.tlstransport import TLSTransport
from securemsg.tls.contexts import peer_identity


class ConnectionHost(Protocol):
    """What a connection needs of the server that accepted it (the server is one)."""

    config: ServerConfig
    broker: Broker
    #: Requests and frames answered with an error, by code (read by the metrics).
    refused_requests: Counter[str]
    #: Whether info and debug events are written (a connection's opening and closing lines,
    #: its joins and leaves, are not built when they would not be).
    logs_info: bool
    logs_debug: bool

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def wheel(self) -> TimerWheel: ...

    @property
    def busy_poll(self) -> BusyPoll: ...

    def connection_closed(self, conn: ServerConnection) -> None: ...

    def session_attached(self, session: ServerSession[Link]) -> None: ...

    def session_detached(self, session: ServerSession[Link]) -> None: ...

    def session_ended(self, session: ServerSession[Link]) -> None: ...


__all__ = ["LOGGED_FAULTS", "ConnectionHost", "ServerConnection"]

#: Faults of one connection (rejected frames, refused requests) logged one by one; past
#: these they are only counted, and one ``faults_not_logged`` line at close gives the count:
#: a client must not be able to fill the server's log (log writes block the event loop).
LOGGED_FAULTS = 10

_logger = structlog.get_logger("securemsg.server.server")
#: Fairness (issue 11): a read of 256 KiB may hold thousands of tiny frames, and carrying them
#: all out in one callback would make every other client wait. What a connection sent is fed
#: to the core in slices, one per event-loop callback, sized so that a slice takes about
#: _SLICE_TIME (halved when one took longer, doubled when one took under a quarter of it; a
#: join costs ~8 times a publish). Requests held back by flow control: _BATCH per callback.
_SLICE_MIN = 4 * 1024
_SLICE_MAX = 256 * 1024
_SLICE_TIME = 0.004
_BATCH = 1024
#: Answers queued past this many bytes are written at once: a full write buffer then holds
#: back the requests after them (see _receive), whatever each answer weighs.
_ANSWERS_CHUNK = 64 * 1024
_SLOW_CONSUMER_GRACE = 1.0  # seconds a slow consumer's close may take before we abort


class ServerConnection(asyncio.BufferedProtocol):
    # Slots: a server holds thousands of these, mostly idle; a __dict__ would cost ~1 KB each.
    __slots__ = (
        "_ack_timer",
        "_backlog",
        "_busy_poll",
        "_close_reason",
        "_durable",
        "_faults",
        "_flush_scheduled",
        "_flushed_at",
        "_invalid",
        "_loop",
        "_opening",
        "_read_buffer",
        "_reading_paused",
        "_session_id",
        "_session_name",
        "_slice",
        "_stash",
        "_timer_slot",
        "_transport_reading",
        "_turn",
        "accepted_at",
        "broker",
        "closed",
        "core",
        "id",
        "identity",
        "peer",
        "server",
        "session",
        "transport",
        "writable",
    )

    def __init__(
        self, server: ConnectionHost, *, conn_id: int, peer: str, accepted_at: float
    ) -> None:
        config = server.config
        self.server = server
        self.broker = server.broker
        self.id = conn_id
        self.peer = peer
        self.accepted_at = accepted_at
        self._loop = server.loop
        self._busy_poll = server.busy_poll
        self._read_buffer = read_buffer()
        self.core = protocol.Server(
            now=accepted_at,
            handshake_timeout=config.handshake_timeout,
            max_frame=config.max_frame,
            max_depth=config.max_depth,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
        )
        self.transport: asyncio.Transport | None = None
        self.session: ServerSession[Link] | None = None
        self.identity: str | None = None
        self._session_name: str | None = None  # kept after a bye ends the session
        self._session_id: str | None = None
        self._flush_scheduled = False
        self._flushed_at = 0  # core.bytes_out at the last flush
        # The slot of our deadline in the server's timer wheel (no TimerHandle per connection).
        self._timer_slot: int | None = None
        # Armed at the session's ack_due_at while it holds acks (see _flush).
        self._ack_timer: asyncio.TimerHandle | None = None
        self._close_reason = "peer_closed"
        self._faults = 0  # rejected frames and refused requests, logged or not
        self._invalid = 0  # rejected frames (max_invalid_frames closes the connection)
        self.closed = self._loop.create_future()
        self._durable = self.broker.store.durable
        self.writable = True
        # Flow control: requests read while a session they publish to is congested wait
        # here, in order, and reading stops until the broker says go on.
        self._reading_paused = False
        self._stash: list[MessageReceived] | None = None
        # Fairness: bytes read and not yet fed to the core (reading stops meanwhile).
        self._backlog: bytearray | None = None
        self._transport_reading = True
        self._slice = 64 * 1024
        self._turn = 0
        # A cluster node opens sessions asynchronously (records in NATS): the task doing it.
        self._opening: asyncio.Task[None] | None = None

    @property
    def log(self) -> FilteringBoundLogger:
        """This connection's logger. Bound when something is logged, which is rare next to
        the connection's life: keeping one bound logger per connection cost ~650 bytes."""
        if self._session_id is None:
            return _logger.bind(conn=self.id, peer=self.peer)  # type: ignore[no-any-return]
        return _logger.bind(  # type: ignore[no-any-return]
            conn=self.id, peer=self.peer, name=self._session_name, session=self._session_id
        )

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The server's is a TLSTransport; the loops' own SSL transports have the same methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.server.config.max_outgoing_bytes)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.identity = peer_identity(ssl_object)
        self._arm_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out at once: the next read, on any connection of this thread, overwrites it.
        self.data_received(self._read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if self._backlog is not None:  # read while pausing: after what waits already
            self._backlog += data
            return
        # A transport may hand over many reads in one callback (a TLS record each): the
        # slice is per callback, counted in _turn until the loop comes round (_turn_over).
        turn = self._turn
        if not turn:
            self._loop.call_soon(self._turn_over)
        room = self._slice - turn
        if len(data) <= room:
            self._turn = turn + len(data)
            self._receive(data)
            return
        self._turn = self._slice
        self._backlog = bytearray(data[room:])
        self._update_reading()
        self._loop.call_soon(self._read_backlog)
        if room > 0:
            self._receive_slice(data[:room])

    def _turn_over(self) -> None:
        self._turn = 0

    def _read_backlog(self) -> None:
        """Feed the core the next slice of what was read (one slice per callback)."""
        backlog = self._backlog
        if backlog is None:
            return
        size = self._slice
        data = bytes(backlog[:size])
        del backlog[:size]
        if not backlog:
            self._backlog = None
            self._update_reading()
        else:
            self._loop.call_soon(self._read_backlog)
        if self.core.state is not ConnectionState.CLOSED:
            self._receive_slice(data)

    def _receive_slice(self, data: bytes) -> None:
        started = time.perf_counter()
        self._receive(data)
        spent = time.perf_counter() - started
        if spent > _SLICE_TIME:
            self._slice = max(_SLICE_MIN, self._slice // 2)
        elif spent < _SLICE_TIME / 4:
            self._slice = min(_SLICE_MAX, self._slice * 2)

    def _update_reading(self) -> None:
        """Read from the transport unless flow control or a backlog says wait."""
        transport = self.transport
        reading = (
            not self._reading_paused
            and self.writable
            and self._backlog is None
            and self._stash is None
        )
        if reading is self._transport_reading or transport is None or transport.is_closing():
            return
        self._transport_reading = reading
        if reading:
            # The silence while we did not read was ours, not the client's.
            self.core.last_received = self._loop.time()
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _receive(self, data: bytes) -> None:
        core = self.core
        now = self._loop.time()
        events = core.receive_data(data, now)
        if events:
            ts = time.time()
            for event in events:
                if type(event) is MessageReceived:
                    if self._stash is not None or not self.writable:
                        self._hold(event, now, ts)
                    else:
                        self._on_message(event.message, now, ts)
                        if core.bytes_out - self._flushed_at > _ANSWERS_CHUNK:
                            self._flush()  # a full buffer (pause_writing) holds the rest
                elif type(event) is BatchReceived:
                    self._on_batch(event, now, ts)
                elif type(event) is FrameRejected:
                    self._on_rejected(event)
                if not core.is_active:
                    break
        self._flush(closing=core.state is ConnectionState.CLOSING)

    def _on_batch(self, batch: BatchReceived, now: float, ts: float) -> None:
        """Each item of a ``batch`` as if it had come in a frame of its own."""
        self._busy_poll.touch()
        for rejected in batch.rejected:
            self._on_rejected(rejected)
        core, session, broker = self.core, self.session, self.broker
        direct = session is not None and not self._durable
        for message in batch.messages:
            if self._stash is not None or not self.writable:
                self._hold(MessageReceived(message), now, ts)
            elif direct and self.session is session:
                # _on_message's hot path, inlined: the session is there and not durable.
                event = session.receive(message, now, ts, broker)  # type: ignore[union-attr]
                if event is not None:
                    self._on_session_event(session, event)  # type: ignore[arg-type]
            else:
                self._on_message(message, now, ts)
            if not core.is_active:
                break
        if core.bytes_out - self._flushed_at > _ANSWERS_CHUNK:
            self._flush()

    def _hold(self, event: MessageReceived, now: float, ts: float) -> None:
        """Reading is paused (flow control, or a write buffer the client does not empty):
        keep a request for later, in order. An ack is carried out at once, whatever it
        follows: it may be what relieves the congestion we wait for, and it is answered by
        nothing."""
        if type(event.message) is Ack and self.session is not None:
            self._on_message(event.message, now, ts)
        else:
            stash = self._stash
            if stash is None:
                stash = self._stash = []
            stash.append(event)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the rest

    def pause_writing(self) -> None:
        # The peer reads slower than we write and the buffer reached max_outgoing_bytes:
        # deliveries wait in the session's delivery log (see Broker.deliver) until it drains,
        # and so do its requests: their answers would otherwise pile up here without bound
        # (a `who` of a large room is a 40-byte request and up to max_frame of answer).
        self.writable = False
        self._update_reading()

    def resume_writing(self) -> None:
        self.writable = True
        session = self.session
        if session is not None and session.link is self:
            frames = session.delivery.unsent()
            if self._durable:  # numbered messages leave once stored (see Broker.deliver)
                self.broker.store.after_commit(self._queue_frames, frames)
            else:
                self._queue_frames(frames)
        if self._stash is not None:
            self._loop.call_soon(self._carry_on)
        else:
            self._update_reading()

    def _queue_frames(self, frames: list[bytes]) -> None:
        """Queue deliveries (whole ``message`` frames) and write them."""
        send = self.core.send_relayed
        for frame in frames:
            send(frame)
        self._flush()

    # -- flow control (broker.Link) -----------------------------------------------------------

    def pause_reading(self) -> None:
        if self._reading_paused:
            return
        self._reading_paused = True
        if self._stash is None:
            self._stash = []
        self._update_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        # Not now: we are inside another connection's ack, and what we held may publish to it.
        self._loop.call_soon(self._carry_on)

    def _carry_on(self) -> None:
        """Carry out the held requests, in order, until done or paused again."""
        stash = self._stash
        if stash is None or self._reading_paused or not self.writable or not self.core.is_active:
            return
        now, ts = self._loop.time(), time.time()
        done = 0
        core = self.core
        for event in stash:
            done += 1
            self._on_message(event.message, now, ts)
            if core.bytes_out - self._flushed_at > _ANSWERS_CHUNK:
                self._flush()
            if self._reading_paused or not self.writable or not core.is_active or done == _BATCH:
                break
        del stash[:done]
        if not self._reading_paused and self.writable:
            self._stash = None if not stash else stash
            if stash:
                self._loop.call_soon(self._carry_on)
            else:
                self._update_reading()
        self._flush(closing=self.core.state is ConnectionState.CLOSING)

    def connection_lost(self, exc: Exception | None) -> None:
        backlog, self._backlog = self._backlog, None
        if backlog and self.core.is_active:  # what was read is carried out, as it always was
            self._receive(bytes(backlog))
        self.core.connection_lost()
        self._cancel_timer()
        self._cancel_ack_timer()
        session = self.session
        if session is not None:
            self.broker.detach(session, self, self._loop.time(), wall=time.time())
            self.server.session_detached(session)
        if self._faults > LOGGED_FAULTS:
            self.log.warning("faults_not_logged", count=self._faults - LOGGED_FAULTS)
        if self.server.logs_info:
            self._log_closed(exc)
        self.server.connection_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def _log_closed(self, exc: Exception | None) -> None:
        core = self.core
        self.log.info(
            "connection_closed",
            name=self._name,
            reason=self._close_reason if exc is None else f"{self._close_reason}: {exc}",
            duration=round(self._loop.time() - self.accepted_at, 3),
            frames_in=core.frames_in,
            frames_out=core.frames_out,
            bytes_in=core.bytes_in,
            bytes_out=core.bytes_out,
        )

    # -- broker.Link --------------------------------------------------------------------------

    def queue(self, frame: bytes) -> None:
        self.core.send_frame(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def queue_message(self, frame: bytes) -> None:
        # Consecutive deliveries may leave as one batch (protocol 3).
        self.core.send_relayed(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def queue_delivery(self, prefix: bytes, seq: int) -> None:
        # splice_payload inlined (a call less per delivery): the same bytes.
        self.core.send_relayed_payload(b"%s%d}" % (prefix, seq))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def close_with(self, code: str, message: str) -> None:
        if self.core.state is ConnectionState.CLOSED:
            return
        self._close_reason = code
        self._send_acks()  # what was carried out need not be resent
        self.core.fail(code, message)
        self._flush(closing=True)

    def acks_held(self) -> None:
        """The router held an ack for this connection's session from outside a read (a
        cluster node, once a request is stored): see that it goes out in time."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_bye(self, reason: str) -> None:
        self._close_reason = reason
        self._send_acks()
        self.core.send_bye(reason)
        self._flush(closing=True)

    # -- internals ----------------------------------------------------------------------------

    @property
    def close_reason(self) -> str:
        """Why the connection ended (or will): a fatal code, a bye reason, peer_closed."""
        return self._close_reason

    @property
    def _name(self) -> str | None:
        return self._session_name

    def _flush(self, *, closing: bool = False) -> None:
        """Write what the core queued (with any held acks); ``closing``: then close, in the
        same TCP write as the close_notify when the transport can (TLSTransport)."""
        self._flush_scheduled = False
        self._flushed_at = self.core.bytes_out
        session = self.session
        if session is not None and session.ack_due_at is not None:
            # Held acks go with any other frame (a delivery, a pong, an error): a request's
            # ack then travels with its reply, one read for the client instead of two.
            acks = session.acks_to_send(self, sending=self.core.has_data_to_send)
            if acks is not None:
                self._send_acks_frame(acks)
            elif self._ack_timer is None and session.link is self:
                self._ack_timer = self._loop.call_at(session.ack_due_at, self._acks_due)
        transport = self.transport
        if transport is None or transport.is_closing():
            self.core.data_to_send()
            return
        data = self.core.data_to_send()
        if data:
            # One write of the joined frames, not writelines: the SSL transports (asyncio's
            # and uvloop's) encrypt each item of writelines as its own TLS record, one
            # SSLObject.write call and ~22 bytes of record overhead per frame.
            payload = data[0] if len(data) == 1 else b"".join(data)
            if closing and isinstance(transport, TLSTransport):
                transport.write_and_close(payload)
                return
            transport.write(payload)
        if closing:
            self._close()

    def _send_acks(self) -> None:
        """Send the session's held acks now (they are due, or we are closing)."""
        session = self.session
        if session is not None:
            acks = session.take_acks(self)
            if acks is not None:
                self._send_acks_frame(acks)

    def _send_acks_frame(self, acks: ServerAck) -> None:
        self._cancel_ack_timer()
        if self._durable:
            # An ack says the request is carried out *and stored*: it waits for the commit.
            self.broker.store.after_commit(self._send_stored_acks, acks)
        elif self.core.state is not ConnectionState.CLOSED:
            self.core.send(acks)

    def _send_stored_acks(self, acks: ServerAck) -> None:
        if self.core.state is not ConnectionState.CLOSED:
            self.core.send(acks)
            self._flush()

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _acks_due(self) -> None:
        self._ack_timer = None
        self._send_acks()
        self._flush()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _arm_timer(self) -> None:
        if self.core.state is ConnectionState.CLOSED:
            return
        self._timer_slot = self.server.wheel.schedule(self.core.next_deadline(), self)

    def _cancel_timer(self) -> None:
        if self._timer_slot is not None:
            self.server.wheel.cancel(self._timer_slot, self)
            self._timer_slot = None

    def on_timer(self) -> None:
        """Our deadline came (called by the server's timer wheel)."""
        self._timer_slot = None
        now = self._loop.time()
        if self._reading_paused:
            self.core.last_received = now  # we do not read: the client is not silent
        for event in self.core.tick(now):
            if type(event) is PeerTimedOut:
                self._close_reason = event.code
                self.log.warning(event.code, name=self._name, silence=round(event.silence, 3))
                if self.transport is not None:
                    # A silent peer never answers TLS close_notify, and the TLS layer waits 30 s
                    # for it with the session still attached: a dead one is dropped now, one
                    # that never said hello gets a moment to read the error first.
                    dead = event.code == ErrorCode.HEARTBEAT_TIMEOUT
                    grace = 0.0 if dead else _SLOW_CONSUMER_GRACE
                    self._loop.call_later(grace, self.transport.abort)
        closing = self.core.state is ConnectionState.CLOSING
        self._flush(closing=closing)
        if not closing and self.core.state is not ConnectionState.CLOSED:
            self._arm_timer()

    def _on_rejected(self, event: FrameRejected) -> None:
        error = event.error
        self.server.refused_requests[error.code] += 1
        self._faults += 1
        if self._faults <= LOGGED_FAULTS or event.fatal:
            self.log.warning(
                "frame_rejected",
                name=self._name,
                code=error.code,
                reason=error.message,
                fatal=event.fatal,
            )
        if event.fatal:
            self._close_reason = error.code
            return
        self._invalid += 1
        limit = self.server.config.max_invalid_frames
        if self._invalid >= limit:
            # A client that keeps sending what it knows is invalid is broken or hostile.
            reason = f"{self._invalid} invalid frames (max_invalid_frames {limit}); closing"
            self.log.warning(
                "frame_rejected", name=self._name, code=ErrorCode.BAD_FRAME, reason=reason,
                fatal=True,
            )  # fmt: skip
            self._close_reason = ErrorCode.BAD_FRAME
            self.core.fail(ErrorCode.BAD_FRAME, reason)

    def _on_message(self, message: Any, now: float, ts: float) -> None:
        session = self.session
        if session is None:
            self._on_hello(message, now)
            return
        if type(message) is Bye:
            self._close_reason = "client_bye"
            self._send_acks()
            self.broker.end(session, reason="bye")
            self.server.session_ended(session)
            self.session = None
            self.core.send_bye("client_bye")
            return
        # A request or a message in: its answer, or the next one, may follow within the
        # busy poll (not after a hello or a bye, which nothing quick follows).
        self._busy_poll.touch()
        if self._durable:
            self._receive_stored(session, message, now, ts)
            return
        event = session.receive(message, now, ts, self.broker)
        if event is not None:
            self._on_session_event(session, event)

    def _receive_stored(
        self, session: ServerSession[Link], message: Any, now: float, ts: float
    ) -> None:
        """:meth:`ServerSession.receive`, and what the store must know of it: the ids of
        requests carried out (a resend after a restart is still a resend) and acks."""
        store = self.broker.store
        msg_id: str | None = None if type(message) is Ack else message.id
        fresh = msg_id is not None and msg_id not in session.recent
        event = session.receive(message, now, ts, self.broker)
        refused = type(event) is RequestRefused
        if fresh and not refused and msg_id is not None and msg_id in session.recent:
            store.id_recorded(session.id, msg_id)
        elif type(message) is Ack:
            store.acked(session.id, session.delivery.acked)
        if event is not None:
            self._on_session_event(session, event)

    def _on_session_event(self, session: ServerSession[Link], event: SessionEvent) -> None:
        if event is RELIEVED:  # first: it follows acks, the most frequent of these
            self.broker.relieved(session)
        elif isinstance(event, Answered):
            if event.frame:  # empty: the router answers later (a cluster's who)
                self.queue(event.frame)
        elif isinstance(event, Joined):
            # debug, as NATS and Mosquitto do: at info a join/leave flood was 167 bytes of
            # log a request and doubled its cost (40,000 requests: 0.32 s -> 0.70 s).
            # Not even bound below debug: a logger bound per join cost ~2 µs of a flood's.
            if self.server.logs_debug:
                self.log.debug("joined", name=session.name, room=event.room)
        elif isinstance(event, Left):
            if self.server.logs_debug:
                self.log.debug("left", name=session.name, room=event.room)
        elif isinstance(event, RequestRefused):
            self.server.refused_requests[event.error.code] += 1
            self._faults += 1
            if self._faults <= LOGGED_FAULTS:
                self.log.info("request_refused", name=self._name, code=event.error.code)
            self.core.send(event.error)
        elif isinstance(event, FrameRejected):  # a bad ack: answered, and the connection goes on
            self.core.send(Error(code=event.error.code, message=event.error.message))
            self._on_rejected(event)

    def _on_hello(self, hello: Hello, now: float) -> None:
        if self.broker.opens_later:
            # What the client pipelined after its hello waits for the session.
            self.pause_reading()
            self._opening = self._loop.create_task(self._open_later(hello, now))
            return
        try:
            opened = self.broker.open(hello, identity=self.identity, link=self, now=now)
        except ProtocolError as refused:
            self._refuse_hello(hello, refused)
            return
        self._welcome(hello, opened)

    async def _open_later(self, hello: Hello, now: float) -> None:
        try:
            opened = await self.broker.open_later(hello, identity=self.identity, link=self, now=now)
        except ProtocolError as refused:
            self._refuse_hello(hello, refused)
        else:
            if self.core.is_active:
                self._welcome(hello, opened)
            else:  # the client went away meanwhile: the session waits for a resume
                self.broker.detach(opened.session, self, self._loop.time(), wall=time.time())
                self.server.session_detached(opened.session)
        finally:
            self._opening = None
        closing = self.core.state is ConnectionState.CLOSING
        self._flush(closing=closing)
        if not closing:
            self.resume_reading()

    def _refuse_hello(self, hello: Hello, refused: ProtocolError) -> None:
        self.server.refused_requests[refused.code] += 1
        self.log.warning(
            "session_refused", name=hello.name, code=refused.code, reason=refused.message
        )
        self._close_reason = refused.code
        self.core.fail(refused.code, refused.message)

    def _welcome(self, hello: Hello, opened: Opened) -> None:
        config = self.server.config
        session = self.session = opened.session
        self._session_name = session.name
        self.server.session_attached(session)
        self._session_id = session.id
        self.core.accept(
            Welcome(
                # The version both ends speak: a protocol 2 client gets no batch frames.
                version=min(hello.version, PROTOCOL_VERSION),
                session=session.token,
                name=session.name,
                resumed=opened.resumed,
                heartbeat=Heartbeat(
                    interval=config.heartbeat_interval, timeout=config.heartbeat_timeout
                ),
                max_frame=config.max_frame,
                nodes=self.broker.nodes(),
            )
        )
        if self._durable:
            self.broker.store.after_commit(self._queue_frames, opened.replay)
        else:
            for frame in opened.replay:
                self.core.send_relayed(frame)
        if self.server.logs_info:
            if opened.resumed:
                self.log.info(
                    "session_resumed",
                    last_seq=hello.last_seq,
                    replayed=len(opened.replay),
                    took_over=opened.took_over,
                )
            else:
                self.log.info("session_started", resumed_requested=hello.session is not None)
        # The handshake deadline no longer applies: the heartbeat's does (a later one keeps
        # the slot, and on_timer arms again when it comes early).
        self._timer_slot = self.server.wheel.reschedule(
            self._timer_slot, self.core.next_deadline(), self
        )
