"""Connection state machines, sans-I/O: bytes in, events out, bytes to send.

Theory of operation
-------------------
A driver owns the socket and the clock. It calls :meth:`Connection.receive_data` with the
bytes it read and the current time, acts on the returned events, and writes whatever
:meth:`Connection.data_to_send` returns. It also wakes at :meth:`Connection.next_deadline`
and calls :meth:`Connection.tick`, which sends pings and detects silent peers.

Bad bytes from the peer never raise out of this module: they become a
:class:`FrameRejected` event (and, on the server, an ``error`` frame queued to the peer).
When the event is fatal the connection is CLOSING: the driver flushes and closes.

States::

    HANDSHAKE --hello/welcome--> OPEN --fatal error, timeout, bye, close()--> CLOSING/CLOSED

Heartbeat: a ping is due when nothing was sent for ``interval`` or nothing was received for
``interval`` (and no ping went out since); the peer is dead when nothing valid was received
for ``timeout``. Sends are noted with a flag and dated at the next tick, so the hot path
needs no clock: a ping goes out between one and two intervals after the last send.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from securemsg.core.frames import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder, encode_frame
from securemsg.core.gatekeeper import DEFAULT_MAX_DEPTH, DELIVERY_HEADROOM
from securemsg.core.messages import (
    BATCH_VERSION,
    FATAL_CODES,
    MAX_BATCH_ITEMS,
    Batch,
    Bye,
    ClientBound,
    ClientMessage,
    Direct,
    Error,
    ErrorCode,
    Hello,
    MessageBatch,
    Ping,
    Pong,
    Publish,
    Welcome,
    batch_items,
    batch_of,
    client_decoder,
    decode_at_client,
    delivery_seq,
    encode_frame_of,
    relayed_checker,
)
from securemsg.errors import ProtocolError

__all__ = [
    "BatchReceived",
    "Client",
    "Connection",
    "ConnectionState",
    "Event",
    "FrameRejected",
    "MessageReceived",
    "PeerTimedOut",
    "PongReceived",
    "Server",
    "UndecodableMessage",
]

_MAX_OUTSTANDING_PINGS: Final = 8
#: Bytes a ``batch`` frame adds to its items' frames, rounded up: ``{"type":"batch",
#: "items":[`` and ``]}`` (27) less the four-byte headers it drops, plus room to spare.
_BATCH_OVERHEAD: Final = 32


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class MessageReceived:
    """One message arrived (a batch's items arrive as one each)."""

    # A plain class, not a dataclass: made for every message received, and compiled
    # (bench/compile.py) a dataclass's __init__ stays a Python function; this one does not.
    __slots__ = ("message",)

    def __init__(self, message: ClientMessage | ClientBound) -> None:
        self.message = message

    def __eq__(self, other: object) -> bool:
        if type(other) is not MessageReceived:
            return NotImplemented
        return bool(self.message == other.message)

    __hash__ = None  # type: ignore[assignment]  # equal by value, mutable: as a dataclass

    def __repr__(self) -> str:
        return f"MessageReceived(message={self.message!r})"


@dataclass(frozen=True, slots=True)
class BatchReceived:
    """Server side: a ``batch`` frame's items that passed their checks, to be carried out in
    order as if each had come alone; ``rejected``: the items refused (each already answered
    with an ``error`` that names its id)."""

    messages: list[Publish | Direct]
    rejected: list[FrameRejected]


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """The peer sent something invalid. ``fatal``: the connection is now closing."""

    error: ProtocolError
    fatal: bool


@dataclass(frozen=True, slots=True)
class PeerTimedOut:
    """Nothing arrived in time; ``code`` is handshake_timeout or heartbeat_timeout."""

    code: str
    silence: float


@dataclass(frozen=True, slots=True)
class PongReceived:
    id: int
    rtt: float


@dataclass(frozen=True, slots=True)
class UndecodableMessage:
    """Client side: the server delivered message ``seq``, but its body cannot be decoded
    here (nested past the recursion limit, a number out of range, ...). Not a protocol
    error: the session acknowledges ``seq``, reports it and carries on, so one bad message
    never costs the connection (it would be delivered again on every resume)."""

    seq: int
    reason: str


Event = (
    MessageReceived
    | BatchReceived
    | FrameRejected
    | PeerTimedOut
    | PongReceived
    | UndecodableMessage
)


class Connection:
    """What both ends share: framing, liveness and the outgoing buffer."""

    # Slots: one of these lives as long as each connection (an idle server holds thousands).
    __slots__ = (
        "_batch",
        "_batch_bytes",
        "_decode",
        "_decoder",
        "_last_ping",
        "_next_ping_id",
        "_out",
        "_pings",
        "_sent_since_tick",
        "batch_limit",
        "bytes_in",
        "bytes_out",
        "close_code",
        "frames_in",
        "frames_out",
        "heartbeat_interval",
        "heartbeat_timeout",
        "is_active",
        "last_received",
        "last_sent",
        "rtt",
        "state",
    )

    _sends_errors = True
    #: Ping at least once an interval even when traffic flows, to keep ``rtt`` current.
    _ping_every_interval = False

    def __init__(
        self,
        *,
        now: float,
        max_frame: int = DEFAULT_MAX_FRAME,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 30.0,
    ) -> None:
        self.state = ConnectionState.HANDSHAKE
        #: Still handshaking or open: frames are read and may be sent. An attribute, kept
        #: by :meth:`_set_state`, not a property: it is read for every message (a property
        #: call cost ~3 % of the server's route).
        self.is_active = True
        self._decoder = FrameDecoder(max_frame)
        self._decode = self._decoder_for(max_frame)
        self._out: list[bytes] = []
        #: Relayed frames waiting to leave as one ``batch`` (see :meth:`send_relayed`).
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        #: Most bytes of frames in one ``batch``; 0 until both ends speak protocol 3.
        self.batch_limit = 0
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.last_received = now
        self.last_sent = now
        self._sent_since_tick = False
        self._last_ping = now
        self._next_ping_id = 0
        self._pings: dict[int, float] = {}
        self.rtt: float | None = None
        self.close_code: str | None = None
        self.frames_in = self.frames_out = 0
        self.bytes_in = self.bytes_out = 0

    def _decoder_for(self, max_frame: int) -> Callable[[bytes], ClientMessage | ClientBound]:
        """What decodes the peer's payloads: what every client can receive (the server)."""
        return client_decoder(max_depth=DEFAULT_MAX_DEPTH, max_frame=max_frame)

    def _set_state(self, state: ConnectionState) -> None:
        """The one way :attr:`state` changes, so that :attr:`is_active` follows it."""
        self.state = state
        self.is_active = state is ConnectionState.OPEN or state is ConnectionState.HANDSHAKE

    # -- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the peer; return what they mean, in order."""
        if not self.is_active:
            return []
        self.bytes_in += len(data)
        return self._receive_frames(data, now)

    def _receive_frames(self, data: bytes, now: float, *, limit: int = 0) -> list[Event]:
        try:
            payloads = self._decoder.feed(data, limit=limit)
        except ProtocolError as exc:
            return [self._reject(exc, fatal=True)]
        events: list[Event] = []
        for payload in payloads:
            event = self._receive_payload(payload, now)
            if event is not None:
                if type(event) is list:  # a batch's messages, on the client
                    events += event
                else:
                    events.append(event)  # type: ignore[arg-type]
                if not self.is_active:
                    return events
        if self._decoder.error is not None:
            events.append(self._reject(self._decoder.error, fatal=True))
        return events

    def _receive_payload(self, payload: bytes, now: float) -> Event | list[Event] | None:
        self.frames_in += 1
        try:
            message = self._decode(payload)
        except ProtocolError as exc:
            return self._undecodable(payload, exc, now)
        self.last_received = now
        if self.state is ConnectionState.HANDSHAKE:
            # Not even ping or pong may come before hello (on the client: before welcome).
            return self._check_message(message)
        if type(message) is Ping:
            self.send(Pong(id=message.id))
            return None
        if type(message) is Pong:
            sent = self._pings.pop(message.id, None)
            if sent is None:
                return None
            self.rtt = now - sent
            return PongReceived(message.id, self.rtt)
        return self._check_message(message)

    def _undecodable(
        self, payload: bytes, error: ProtocolError, now: float
    ) -> Event | list[Event] | None:
        fatal = error.code in FATAL_CODES or self.state is ConnectionState.HANDSHAKE
        return self._reject(error, fatal=fatal)

    def _check_message(self, message: ClientMessage | ClientBound) -> Event | list[Event] | None:
        return MessageReceived(message)

    def _reject(self, error: ProtocolError, *, fatal: bool) -> FrameRejected:
        if self._sends_errors:
            self.send(Error(code=error.code, message=error.message, ref=error.ref))
        if fatal:
            self._set_state(ConnectionState.CLOSING)
            self.close_code = error.code
        return FrameRejected(error, fatal)

    # -- sending ------------------------------------------------------------------------------

    def send(self, message: msgspec.Struct) -> None:
        self.send_frame(encode_frame_of(message))

    def send_frame(self, frame: bytes) -> None:
        """Queue one whole frame (header included) for the peer."""
        if self._batch:
            self._close_batch()  # in order: the relayed frames queued before this one
        self._out.append(frame)
        self._sent_since_tick = True
        self.frames_out += 1
        self.bytes_out += len(frame)

    def send_relayed(self, frame: bytes) -> None:
        """Queue the whole frame of a relayed message (the server's ``message``, the client's
        ``publish`` or ``direct``). Once both ends speak protocol 3, consecutive ones leave as
        one ``batch`` frame (up to :data:`MAX_BATCH_ITEMS` and :attr:`batch_limit` bytes):
        the receiver decodes them in one pass instead of one frame each."""
        if not self.batch_limit:
            self.send_frame(frame)
            return
        self.send_relayed_payload(frame[HEADER_SIZE:])

    def send_relayed_payload(self, payload: bytes) -> None:
        """:meth:`send_relayed` for a frame's payload alone (the server's deliveries): a
        batch holds payloads, so a delivery gets no header only for the batch to cut it off
        again (the two cost ~0.7 µs per delivery)."""
        if not self.batch_limit:
            self.send_frame(encode_frame(payload))
            return
        batch = self._batch
        size = len(payload) + HEADER_SIZE  # counted as the frame it would be alone
        if batch and (len(batch) >= MAX_BATCH_ITEMS or self._batch_bytes + size > self.batch_limit):
            self._close_batch()
            batch = self._batch
        batch.append(payload)
        self._batch_bytes += size
        self._sent_since_tick = True
        self.frames_out += 1
        self.bytes_out += size

    def _close_batch(self) -> None:
        batch = self._batch
        self._out.append(encode_frame(batch[0]) if len(batch) == 1 else batch_of(batch))
        self._batch = []
        self._batch_bytes = 0

    def data_to_send(self) -> list[bytes]:
        """Take the queued frames; write them joined, in one ``write`` (see the drivers)."""
        if self._batch:
            self._close_batch()
        out = self._out
        if out:
            self._out = []
        return out

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out) or bool(self._batch)

    def fail(self, code: str, message: str) -> None:
        """Close with an error the peer is told about (where this end sends errors)."""
        if self.state is ConnectionState.CLOSED:
            return
        if self._sends_errors:
            self.send(Error(code=code, message=message))
        self._set_state(ConnectionState.CLOSING)
        self.close_code = code

    def send_bye(self, reason: str) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.send(Bye(reason=reason))
        self._set_state(ConnectionState.CLOSING)
        self.close_code = reason

    def connection_lost(self) -> None:
        self._set_state(ConnectionState.CLOSED)

    # -- time -----------------------------------------------------------------------------------

    def set_heartbeat(self, *, interval: float, timeout: float) -> None:
        self.heartbeat_interval = interval
        self.heartbeat_timeout = timeout

    def next_deadline(self) -> float:
        """When :meth:`tick` next has work to do (it may find none, and tell a later time)."""
        interval = self.heartbeat_interval
        deadline = min(
            self.last_received + self.heartbeat_timeout,
            self.last_sent + interval,
            max(self.last_received, self._last_ping) + interval,
        )
        if self._ping_every_interval:
            deadline = min(deadline, self._last_ping + interval)
        return deadline

    def tick(self, now: float) -> list[Event]:
        """Send a ping when one is due; report a peer that has been silent too long."""
        if self.state is not ConnectionState.OPEN:
            return []
        # Compare with the very sums next_deadline() returns: ``now - t >= d`` can be False
        # at ``now == t + d`` in floating point, and a driver woken then would spin.
        silence = now - self.last_received
        if now >= self.last_received + self.heartbeat_timeout:
            self.fail(ErrorCode.HEARTBEAT_TIMEOUT, f"nothing received for {silence:.1f} s")
            return [PeerTimedOut(ErrorCode.HEARTBEAT_TIMEOUT, silence)]
        if self._sent_since_tick:
            self._sent_since_tick = False
            self.last_sent = now
        interval = self.heartbeat_interval
        if (
            now >= self.last_sent + interval
            or now >= max(self.last_received, self._last_ping) + interval
            or (self._ping_every_interval and now >= self._last_ping + interval)
        ):
            self._ping(now)
        return []

    def ping(self, now: float) -> None:
        """Send a ping now. The server answers it with its held acks and the pong together,
        so a client waiting for an answer sends one to get its acks without delay."""
        if self.state is ConnectionState.OPEN:
            self._ping(now)

    def _ping(self, now: float) -> None:
        self._next_ping_id += 1
        if len(self._pings) >= _MAX_OUTSTANDING_PINGS:
            self._pings.pop(next(iter(self._pings)))
        self._pings[self._next_ping_id] = now
        self._last_ping = now
        self.send(Ping(id=self._next_ping_id))
        self._sent_since_tick = False
        self.last_sent = now


class Server(Connection):
    """The server's end of one connection: expects ``hello`` first, within a deadline."""

    __slots__ = (
        "_check_relayed",
        "_early_pings",
        "_hello_seen",
        "_max_depth",
        "_peer_version",
        "handshake_deadline",
    )

    def __init__(
        self,
        *,
        now: float,
        handshake_timeout: float = 10.0,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_frame: int = DEFAULT_MAX_FRAME,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 30.0,
    ) -> None:
        self._max_depth = max_depth  # before the base's __init__, which calls _decoder_for
        # Named, not **kwargs: mypyc (the optional compiled build) fails on keyword-only
        # arguments with defaults followed by **kwargs.
        super().__init__(
            now=now,
            max_frame=max_frame,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        self._check_relayed = relayed_checker(max_depth=max_depth)
        self._peer_version = 0
        self.handshake_deadline = now + handshake_timeout
        self._hello_seen = False
        #: Pings that came after hello in its read, answered right after welcome.
        self._early_pings: list[int] = []

    def _decoder_for(self, max_frame: int) -> Callable[[bytes], ClientMessage | ClientBound]:
        # What every client can receive (see core.gatekeeper): checked as frames are decoded.
        return client_decoder(max_depth=self._max_depth, max_frame=max_frame)

    def _check_message(self, message: ClientMessage | ClientBound) -> Event | None:
        # A client may pipeline frames right after its hello; they can arrive in the same read,
        # before the driver has accepted the hello, so "after hello" is what counts here.
        if self.state is ConnectionState.HANDSHAKE and not self._hello_seen:
            if type(message) is not Hello:
                error = ProtocolError("bad_message", "the first message must be 'hello'")
                return self._reject(error, fatal=True)
            self._hello_seen = True
            self._peer_version = message.version
            return MessageReceived(message)
        if type(message) is Batch:
            return self._batch_received(message)
        if type(message) is Hello:
            error = ProtocolError("bad_message", "'hello' was already received")
            return self._reject(error, fatal=False)
        if self.state is ConnectionState.HANDSHAKE:
            # Pipelined after hello: the pong may not go before welcome; accept() sends it.
            if type(message) is Ping:
                if len(self._early_pings) < _MAX_OUTSTANDING_PINGS:
                    self._early_pings.append(message.id)
                return None
            if type(message) is Pong:
                return None  # we sent no ping yet
        return MessageReceived(message)

    def _batch_received(self, batch: Batch) -> BatchReceived:
        check = self._check_relayed
        messages: list[Publish | Direct] = []
        rejected: list[FrameRejected] = []
        for item in batch.items:
            try:
                check(item)
            except ProtocolError as exc:
                rejected.append(self._reject(exc, fatal=False))
                continue
            messages.append(item)
        return BatchReceived(messages, rejected)

    def accept(self, welcome: Welcome) -> None:
        """The driver accepted the hello: send ``welcome`` and open the connection."""
        self.send(welcome)
        if self._peer_version >= BATCH_VERSION:
            # The client reads frames up to our max_frame at least (protocol, section 2).
            self.batch_limit = self._decoder.max_frame - _BATCH_OVERHEAD
        self._set_state(ConnectionState.OPEN)
        if self._early_pings:
            pings, self._early_pings = self._early_pings, []
            for ping_id in pings:
                self.send(Pong(id=ping_id))

    def next_deadline(self) -> float:
        if self.state is ConnectionState.HANDSHAKE:
            return self.handshake_deadline
        return super().next_deadline()

    def tick(self, now: float) -> list[Event]:
        if self.state is ConnectionState.HANDSHAKE and now >= self.handshake_deadline:
            self.fail(ErrorCode.HANDSHAKE_TIMEOUT, "no 'hello' within the handshake timeout")
            return [PeerTimedOut(ErrorCode.HANDSHAKE_TIMEOUT, now - self.last_received)]
        return super().tick(now)


class Client(Connection):
    """The client's end: sends ``hello``, becomes OPEN on ``welcome``."""

    __slots__ = ()

    _sends_errors = False
    _ping_every_interval = True

    def _decoder_for(self, max_frame: int) -> Callable[[bytes], ClientMessage | ClientBound]:
        return decode_at_client

    def hello(self, hello: Hello) -> None:
        self.send(hello)

    @property
    def max_frame(self) -> int:
        """The largest frame read from the server: what ``welcome`` advertised, or more."""
        return self._decoder.max_frame

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is not ConnectionState.HANDSHAKE or not self.is_active:
            return super().receive_data(data, now)
        # Until welcome, one frame at a time: welcome sets the read limit for the frames that
        # follow it, and a resumed session's replay can come in the same read.
        self.bytes_in += len(data)
        events = self._receive_frames(data, now, limit=1)
        while self.state is ConnectionState.HANDSHAKE and self._decoder.buffered and events:
            more = self._receive_frames(b"", now, limit=1)
            events += more
            if not more:
                break
        if self.is_active and self._decoder.buffered:
            events += self._receive_frames(b"", now)
        return events

    def _undecodable(
        self, payload: bytes, error: ProtocolError, now: float
    ) -> Event | list[Event] | None:
        # A message the server relayed whole but whose body is beyond this client (too
        # deep for its stack, a number out of range): skip it, never drop the connection.
        if self.state is ConnectionState.OPEN:
            items = batch_items(payload)
            if items is not None:
                # One item spoiled the batch: take them one by one, skipping only that one.
                return self._receive_items(items, now)
            seq = delivery_seq(payload)
            if seq is not None:
                self.last_received = now
                return UndecodableMessage(seq, error.message)
        return super()._undecodable(payload, error, now)

    def _receive_items(self, items: list[bytes], now: float) -> list[Event]:
        events: list[Event] = []
        for item in items:
            event = self._receive_payload(item, now)
            if type(event) is list:  # a batch inside a batch: not what a server sends
                nested = ProtocolError("bad_frame", "a 'batch' inside a 'batch'")
                event = self._reject(nested, fatal=True)
            if event is not None:
                events.append(event)  # type: ignore[arg-type]
            if not self.is_active:
                break
        return events

    def _check_message(self, message: ClientMessage | ClientBound) -> Event | list[Event] | None:
        if type(message) is MessageBatch and self.state is ConnectionState.OPEN:
            return [MessageReceived(item) for item in message.items]
        if self.state is ConnectionState.HANDSHAKE:
            if type(message) is Welcome:
                self._set_state(ConnectionState.OPEN)
                if message.version >= BATCH_VERSION:
                    # A batch of publishes is subject to the size rule of one publish.
                    limit = message.max_frame - DELIVERY_HEADROOM - _BATCH_OVERHEAD
                    self.batch_limit = max(limit, 0)
                # The server's deliveries fit its max_frame; its own frames (acks of up to
                # ACK_BATCH ids, errors) may not fit a tiny one, so never below the default.
                self._decoder.max_frame = max(message.max_frame, DEFAULT_MAX_FRAME)
            elif type(message) is not Error and type(message) is not Bye:
                error = ProtocolError("bad_message", "the first message must be 'welcome'")
                return self._reject(error, fatal=True)
        return MessageReceived(message)
