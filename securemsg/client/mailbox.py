"""A client session's bookkeeping across connections: what was sent and not yet answered, and
what was received and not yet handed to the application.

Everything the client sends carries an id from the :class:`~securemsg.core.delivery.Outbox` (join,
leave, who, publish, direct) and stays there until the server answers that id (``ack``,
``members``, or ``error`` with ``ref``); after a reconnect the unanswered frames go out again
with the same ids, and the server acks a repeated id without delivering it twice. Sending
never writes: frames are queued on the connection, which flushes once per loop iteration.

Received messages pass the :class:`~securemsg.core.delivery.Inbox` (duplicates dropped by sequence
number) into a bounded queue; one cumulative ``ack`` goes out per read. When the queue is
full the connection stops reading, so a slow application slows the server down instead of
filling memory. Replies to :meth:`Mailbox.request_token` tokens go to their requester only.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import secrets
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Generic, TypeVar

import msgspec
from structlog.typing import FilteringBoundLogger

from securemsg.client.connection import ClientConnection
from securemsg.client.types import Message, Presence
from securemsg.core import messages
from securemsg.core.connection import Event, FrameRejected, MessageReceived, PongReceived
from securemsg.core.delivery import Inbox, Outbox
from securemsg.core.frames import DEFAULT_MAX_FRAME, HEADER_SIZE
from securemsg.core.messages import (
    FATAL_CODES,
    Ack,
    Bye,
    Members,
    ServerAck,
    encode_frame_of,
)
from securemsg.errors import ClosedError, RejectedError, TimeoutError

__all__ = ["MAX_RECEIVED", "EventStream", "Mailbox", "deadline"]

T = TypeVar("T")

#: Received messages held for the application before the connection stops reading.
MAX_RECEIVED: Final = 10_000
_RESUME_RECEIVED: Final = MAX_RECEIVED // 2
#: Events held per presence() / state_changes() iterator; the oldest are dropped past it.
_MAX_EVENTS: Final = 1_000

Make = Callable[[str], msgspec.Struct]


@contextlib.asynccontextmanager
async def deadline(timeout: float | None, what: str) -> AsyncIterator[None]:
    """``asyncio.timeout`` that raises :class:`securemsg.TimeoutError` naming the wait."""
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            yield
    except builtins.TimeoutError as exc:
        if not scope.expired():
            raise
        raise TimeoutError(f"{what} did not complete within {timeout:g} s") from exc


class EventStream(Generic[T]):
    """An async iterator the client feeds; it ends when the client closes."""

    __slots__ = ("__weakref__", "_queue")

    def __init__(self) -> None:
        self._queue: asyncio.Queue[T | None] = asyncio.Queue()

    def put(self, item: T) -> None:
        if self._queue.qsize() >= _MAX_EVENTS:
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    def end(self) -> None:
        self._queue.put_nowait(None)

    def __aiter__(self) -> EventStream[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return item


class _Received:
    """Messages waiting for ``receive()``: a deque, and futures for the receivers waiting on
    it. Cheaper per message than ``asyncio.Queue``, which does more bookkeeping per put and
    get than a client with one consumer needs."""

    __slots__ = ("_items", "_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Message | None] = deque()
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Message | None) -> None:
        self._items.append(item)
        if self._waiters:
            for waiter in self._waiters:  # each re-checks: one of them gets the item
                if not waiter.done():
                    waiter.set_result(None)

    def popleft(self) -> Message | None:
        return self._items.popleft()

    def put_back(self, item: Message | None) -> None:
        self._items.appendleft(item)

    async def wait(self) -> None:
        """Return once an item is there (cancellable, so a timeout can end the wait)."""
        while not self._items:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)


class _FlushWaiter:
    """``remaining`` outbox entries with ids up to ``mark`` are still unanswered."""

    __slots__ = ("future", "mark", "remaining")

    def __init__(self, mark: int, remaining: int, future: asyncio.Future[None]) -> None:
        self.mark = mark
        self.remaining = remaining
        self.future = future


class Mailbox:
    """The session state a :class:`~securemsg.client.client.Client` keeps across connections; the
    owner (:class:`~securemsg.client.connection.ConnectionOwner`) of its live connection."""

    def __init__(self, *, max_outbox: int, log: FilteringBoundLogger) -> None:
        self._loop = asyncio.get_running_loop()
        self._log = log
        self.outbox = Outbox(max_outbox)
        #: The largest frame body the server accepts (from its welcome).
        self.max_frame = DEFAULT_MAX_FRAME
        self.inbox = Inbox()
        #: The live, welcomed connection, or None between connections.
        self.conn: ClientConnection | None = None
        #: Set once the client is closing: every new call raises it.
        self.closed: ClosedError | None = None
        self.rtt: float | None = None
        self._waiters: dict[str, asyncio.Future[Any]] = {}
        self._requests: dict[str, asyncio.Future[Message]] = {}
        self._request_prefix = f"rq-{secrets.token_hex(4)}-"
        self._request_ids = itertools.count(1)
        self._flushes: list[_FlushWaiter] = []
        self._last_id = "0"
        self._space = asyncio.Event()
        self._space.set()
        self._received = _Received(self._loop)
        self._paused = False
        self.presence_streams: weakref.WeakSet[EventStream[Presence]] = weakref.WeakSet()

    # -- sending ----------------------------------------------------------------------------------

    async def send(self, make: Make, answer: bool, timeout: float | None, what: str) -> Any:
        """Put the frame ``make(id)`` in the outbox, and on the wire when connected. With
        ``answer``, wait for the server's answer to that id and return it (None for an ack,
        the names for a who); an error answer raises :class:`RejectedError`."""
        self._check_open()
        if not answer and not self.outbox.full:
            self.submit(make)
            return None
        async with deadline(timeout, what):
            while self.outbox.full:
                self._space.clear()
                await self._space.wait()
                self._check_open()
            msg_id = self.submit(make)
            if not answer:
                return None
            future: asyncio.Future[Any] = self._loop.create_future()
            self._waiters[msg_id] = future
            if self.conn is not None:
                self.conn.ping()  # someone waits: ask for the ack now, not after ACK_DELAY
            try:
                return await future
            finally:
                self._waiters.pop(msg_id, None)

    def submit(self, make: Make) -> str:
        msg_id = self.outbox.new_id()
        frame = encode_frame_of(make(msg_id))
        if len(frame) - HEADER_SIZE > self.max_frame:
            # The server would close the connection, and the resend after reconnecting would
            # do it again forever: refuse it here.
            raise ValueError(
                f"message of {len(frame) - HEADER_SIZE} bytes exceeds the server's "
                f"max_frame of {self.max_frame} bytes"
            )
        self.outbox.add(msg_id, frame)
        self._last_id = msg_id
        conn = self.conn
        if conn is not None:
            conn.send_frame(frame)
        return msg_id

    def request_token(self) -> tuple[str, asyncio.Future[Message]]:
        """A fresh ``reply_to`` token and the future its first reply will resolve."""
        token = f"{self._request_prefix}{next(self._request_ids)}"
        future: asyncio.Future[Message] = self._loop.create_future()
        self._requests[token] = future
        return token, future

    def forget_request(self, token: str) -> None:
        self._requests.pop(token, None)

    async def flushed(self, timeout: float | None) -> None:
        """Wait until every frame submitted so far is answered."""
        pending = len(self.outbox)
        if not pending:
            return
        waiter = _FlushWaiter(int(self._last_id), pending, self._loop.create_future())
        self._flushes.append(waiter)
        if self.conn is not None:
            self.conn.ping()
        try:
            async with deadline(timeout, f"flush of {pending} messages"):
                await waiter.future
        finally:
            self._flushes.remove(waiter)

    # -- receiving --------------------------------------------------------------------------------

    def take(self) -> Message | None:
        """The next message if one is waiting, without awaiting: receive()'s fast path."""
        received = self._received
        if not received or self._paused:
            return None  # nothing there, or a paused connection to resume: receive() does it
        message = received.popleft()
        if message is None:
            received.put_back(None)  # closed: receive() raises
        return message

    async def receive(self, timeout: float | None) -> Message:
        received = self._received
        if not received:
            async with deadline(timeout, "receive"):
                await received.wait()
        # No await since wait() returned, so no other receiver can have taken the item.
        item = received.popleft()
        if item is None:
            received.put_back(None)  # closed: every later receive() raises too
            raise self.closed or ClosedError("the client is closed")
        if self._paused and len(received) <= _RESUME_RECEIVED:
            self._paused = False
            if self.conn is not None:
                self.conn.resume_reading()
        return item

    # -- connections ------------------------------------------------------------------------------

    def attach(self, conn: ClientConnection, *, resumed: bool, rooms: list[str]) -> None:
        """``conn`` was welcomed. Unless the session was resumed, numbering starts again and
        ``rooms`` are joined again; then every unanswered frame is sent again."""
        resend = self.outbox.unacked()
        self.conn = conn
        if not resumed:
            self.inbox.reset()
            for room in rooms:  # before the resends, so that a resent leave still comes after
                self.submit(lambda msg_id, room=room: messages.Join(room=room, id=msg_id))  # type: ignore[misc]
        for frame in resend:
            conn.send_frame(frame)
        if self._waiters or self._flushes:
            conn.ping()
        if self._paused:
            conn.pause_reading()

    def events_received(self, conn: ClientConnection, events: list[Event]) -> None:
        if conn is not self.conn:
            return
        for event in events:
            if type(event) is MessageReceived:
                message = event.message
                if type(message) is messages.Message:
                    self._message_received(message)
                elif type(message) is ServerAck:
                    answered = self._answered
                    for ref in message.ids:
                        answered(ref, None)
                elif type(message) is Members:
                    if message.ref is not None:
                        self._answered(message.ref, message.names)
                elif type(message) is messages.Presence:
                    self._presence_received(message)
                elif type(message) is messages.Error:
                    self._error_received(conn, message)
                elif type(message) is Bye:
                    conn.reason = conn.reason or message.reason or "bye"
            elif type(event) is PongReceived:
                self.rtt = event.rtt
            elif type(event) is FrameRejected:
                error = event.error
                self._log.warning("frame_rejected", code=error.code, reason=error.message)
        seq = self.inbox.ack_due()
        if seq is not None:
            conn.core.send(Ack(seq=seq))
        if not self._paused and len(self._received) >= MAX_RECEIVED:
            self._paused = True
            conn.pause_reading()

    def connection_closed(self, conn: ClientConnection, reason: str) -> None:
        if conn is self.conn:
            self.conn = None

    def close(self, error: ClosedError) -> None:
        """Closed for good: every waiter gets ``error``, receive() drains then raises it."""
        self.closed = error
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort("client_closed")
        waiting = [*self._waiters.values(), *self._requests.values()]
        waiting += [waiter.future for waiter in self._flushes]
        for future in waiting:
            if not future.done():
                future.set_exception(ClosedError(str(error)))
        self._space.set()
        self._received.put(None)
        for stream in self.presence_streams:
            stream.end()

    # -- internals --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed is not None:
            raise ClosedError(str(self.closed))

    def _answered(self, ref: str, result: Any, error: RejectedError | None = None) -> None:
        """The server answered the frame with id ``ref``: it leaves the outbox."""
        if self.outbox.ack(ref):
            if self._flushes:
                number = int(ref)
                for waiter in self._flushes:
                    if number <= waiter.mark:
                        waiter.remaining -= 1
                        if waiter.remaining <= 0 and not waiter.future.done():
                            waiter.future.set_result(None)
            if not self._space.is_set():
                self._space.set()
        future = self._waiters.pop(ref, None)
        if future is not None and not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        elif error is not None:
            self._log.warning("message_rejected", id=ref, code=error.code, reason=error.message)

    def _message_received(self, message: Message) -> None:
        if not self.inbox.accept(message.seq):
            return
        token = message.re
        if token is not None and token.startswith(self._request_prefix):
            future = self._requests.pop(token, None)
            if future is not None and not future.done():
                future.set_result(message)
            return  # a reply to a request, or a late one: never for receive()
        self._received.put(message)

    def _presence_received(self, event: Presence) -> None:
        for stream in self.presence_streams:
            stream.put(event)

    def _error_received(self, conn: ClientConnection, error: messages.Error) -> None:
        if error.ref is not None:
            self._answered(error.ref, None, RejectedError(error.code, error.message))
            return
        if error.code in FATAL_CODES:
            conn.reason = conn.reason or error.code
        self._log.warning("server_error", code=error.code, reason=error.message)
