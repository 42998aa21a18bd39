"""The asyncio side of a client session: futures, waiters and streams over the sans-I/O
:class:`~securemsg.core.client_session.ClientSession`, which holds the rules.

The session numbers every request (join, leave, who, publish, direct) and keeps it until
the server answers its id; after a reconnect it says what to send again. The mailbox puts
its frames on the live connection (queued there, one write per loop iteration), resolves
the futures of those who wait for an answer, a reply or a flush, and hands received
messages to the application through a queue.

A message is acknowledged once the application has taken it (``receive()``, ``async for``),
not on arrival: a process that dies with messages in its queue leaves them with the server,
which replays them to a resumed session. One cumulative ``ack`` rides with the connection's
next write, so there is at most one per loop iteration (:meth:`Mailbox.queue_ack`).

The queue therefore holds only unacknowledged messages, and the server bounds those per
session (``max_pending``; half way it holds publishers back, and a session that takes
nothing for ``slow_consumer_timeout`` while they wait is ended): an application that stops
taking stops the flow at the server, before the client's memory matters. The client's own
bound, :data:`MAX_RECEIVED`, is kept for servers configured with a larger window: past it
the connection stops reading (acks still go out, as writes), and reads again at half.
"""

from __future__ import annotations

import asyncio
import builtins
import secrets
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import msgspec
from structlog.typing import FilteringBoundLogger

from securemsg.client.connection import ClientConnection
from securemsg.client.types import Message, MessageSkipped, Presence
from securemsg.core.client_session import (
    Acknowledged,
    Answered,
    ClientSession,
    Flush,
    FlushCompleted,
    Make,
    Refused,
    ReplyReceived,
    SessionEvent,
)
from securemsg.core.connection import Event, FrameRejected, PongReceived, UndecodableMessage
from securemsg.core.messages import FATAL_CODES, Ack, Bye, Error
from securemsg.errors import ClosedError, RejectedError, TimeoutError

__all__ = ["MAX_RECEIVED", "Deadline", "EventStream", "Mailbox"]

T = TypeVar("T")

#: Received messages held for the application before the connection stops reading. With a
#: server's default ``max_pending`` (10,000) the session is held back long before this.
MAX_RECEIVED: Final = 10_000
_RESUME_RECEIVED: Final = MAX_RECEIVED // 2
#: Events held per presence() / state_changes() iterator; the oldest are dropped past it.
_MAX_EVENTS: Final = 1_000

#: Streams someone is waiting on. The client holds its streams weakly (an iterator nobody
#: uses must not leak), and asyncio holds tasks weakly, so a watcher task nobody kept a
#: reference to would be garbage-collected while it waits, and miss what it waits for.
_WAITED_ON: set[EventStream[Any]] = set()


class Deadline:
    """``async with Deadline(timeout, what)``: ``asyncio.timeout`` that raises
    :class:`securemsg.TimeoutError` naming the wait; no timer at all when ``timeout`` is None.

    A class, not an ``@asynccontextmanager``: every request and every receive that waits
    enters one, and an async generator costs a context-manager object, a generator, two
    ``anext`` steps and a registration in the loop's WeakSet of async generators (added on
    its first step, removed by a weakref callback when it dies): ~15 Python calls of the ~310
    a request/reply round trip makes in a client.
    """

    __slots__ = ("_scope", "_timeout", "_what")

    def __init__(self, timeout: float | None, what: str) -> None:
        self._timeout = timeout
        self._what = what
        self._scope: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        if self._timeout is not None:
            self._scope = scope = asyncio.timeout(self._timeout)
            await scope.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        scope = self._scope
        if scope is None:
            return
        try:
            await scope.__aexit__(exc_type, exc, traceback)
        except builtins.TimeoutError as error:
            if not scope.expired():
                raise
            raise TimeoutError(
                f"{self._what} did not complete within {self._timeout:g} s"
            ) from error


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
        queue = self._queue
        if queue.empty():
            _WAITED_ON.add(self)
            try:
                item = await queue.get()
            finally:
                _WAITED_ON.discard(self)
        else:
            item = queue.get_nowait()
        if item is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return item


class _Received:
    """Messages waiting for ``receive()``: a deque, and futures for the receivers waiting on
    it. Cheaper per message than ``asyncio.Queue``, which does more bookkeeping per put and
    get than a client with one consumer needs."""

    __slots__ = ("_loop", "_waiters", "items")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        #: Appended to directly by the mailbox for a read's messages, then :meth:`wake`.
        self.items: deque[Message | None] = deque()
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: Message | None) -> None:
        self.items.append(item)
        self.wake()

    def wake(self) -> None:
        """Items may have been appended to ``items`` directly: wake the receivers waiting
        (each re-checks, so one of them gets each item)."""
        if not self.items:
            return
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def popleft(self) -> Message | None:
        return self.items.popleft()

    def seq_at(self, index: int) -> int | None:
        """The ``seq`` of the ``index``-th message waiting, None when there is none."""
        items = self.items
        if len(items) <= index:
            return None
        item = items[index]
        return None if item is None else item.seq

    def put_back(self, item: Message | None) -> None:
        self.items.appendleft(item)

    async def wait(self) -> None:
        """Return once an item is there (cancellable, so a timeout can end the wait)."""
        while not self.items:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)


class Mailbox:
    """The asyncio state a :class:`~securemsg.client.client.Client` keeps across connections
    over its :class:`ClientSession`; the owner
    (:class:`~securemsg.client.connection.ConnectionOwner`) of its live connection."""

    def __init__(
        self,
        *,
        max_outbox: int,
        log: FilteringBoundLogger,
        max_outbox_bytes: int = 1 << 62,
        on_skipped: Callable[[MessageSkipped], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._log = log
        #: Told of each delivered message that could not be decoded (and was skipped).
        self.on_skipped = on_skipped
        self.session = ClientSession(
            max_outbox=max_outbox,
            max_outbox_bytes=max_outbox_bytes,
            request_prefix=f"rq-{secrets.token_hex(4)}-",
        )
        #: The session's outbox (the same object), for the client's publish fast path.
        self.outbox = self.session.outbox
        #: The live, welcomed connection, or None between connections.
        self.conn: ClientConnection | None = None
        #: Set once the client is closing: every new call raises it.
        self.closed: ClosedError | None = None
        self.rtt: float | None = None
        self._waiters: dict[str, asyncio.Future[Any]] = {}
        self._requests: dict[str, asyncio.Future[Message]] = {}
        self._flushes: dict[Flush, asyncio.Future[None]] = {}
        self._space = asyncio.Event()
        self._space.set()
        self._received = _Received(self._loop)
        #: Messages at the head of the queue from a session before this one: their acks
        #: would mean nothing to the new session.
        self._stale = 0
        #: Something may be due for acknowledgement: checked by the connection's next write.
        self.ack_wanted = False
        self._paused = False
        #: The ``seq`` of the message the application took last while it has not asked for
        #: the next one (it may still be handling it); None otherwise. See done_seq().
        self.busy_seq: int | None = None
        #: Called after each message the application takes (the session file), when set.
        self.on_taken: Callable[[], None] | None = None
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
        msg_id: str | None = None
        try:
            async with Deadline(timeout, what):
                while self.outbox.full:
                    self._space.clear()
                    await self._space.wait()
                    self._check_open()
                self.submit(make)
                msg_id = self.session.last_id
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
        except TimeoutError:
            if msg_id is not None and answer:  # the caller gave up on it: so does the outbox
                for event in self.session.abandon(msg_id):
                    if type(event) is FlushCompleted:
                        self._flush_completed(event.flush)
                if not self._space.is_set() and not self.outbox.full:
                    self._space.set()
            raise

    def submit(self, make: Make) -> None:
        """Into the outbox (ValueError past the server's max_frame), and onto the live
        connection if there is one; the id it got is ``session.last_id``."""
        frame = self.session.submit(make)
        if self.conn is not None:
            self.conn.send_frame(frame)

    def submit_publish(self, room: str, body: msgspec.Raw) -> None:
        """:meth:`submit` of a ``publish`` to a checked room (the hot path); it may leave
        with others in one ``batch`` frame."""
        payload = self.session.submit_publish(room, body)
        conn = self.conn
        if conn is not None:
            conn.send_relayed_payload(payload)

    def request_token(self) -> tuple[str, asyncio.Future[Message]]:
        """A fresh ``reply_to`` token and the future its first reply will resolve."""
        token = self.session.request_token()
        future: asyncio.Future[Message] = self._loop.create_future()
        self._requests[token] = future
        return token, future

    def forget_request(self, token: str) -> None:
        self.session.forget_request(token)
        self._requests.pop(token, None)

    async def flushed(self, timeout: float | None) -> None:
        """Wait until every frame submitted so far is answered. Raises
        :class:`RejectedError` when the server refused any of them."""
        flush = self.session.flush()
        if flush is None:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._flushes[flush] = future
        if self.conn is not None:
            self.conn.ping()
        try:
            async with Deadline(timeout, f"flush of {flush.total} messages"):
                await future
        finally:
            self._flushes.pop(flush, None)
            self.session.forget_flush(flush)

    # -- receiving --------------------------------------------------------------------------------

    def take(self) -> Message | None:
        """The next message if one is waiting, without awaiting: receive()'s fast path."""
        if self.busy_seq is not None:
            self._done_with_busy()
        items = self._received.items
        if not items or self._paused:
            return None  # nothing there, or a paused connection to resume: receive() does it
        message = items[0]
        if message is None:
            return None  # closed: receive() raises
        items.popleft()
        self._taken(message)
        return message

    async def receive(self, timeout: float | None) -> Message:
        self._done_with_busy()
        received = self._received
        if not received:
            async with Deadline(timeout, "receive"):
                await received.wait()
        # No await since wait() returned, so no other receiver can have taken the item.
        item = received.popleft()
        if item is None:
            received.put_back(None)  # closed: every later receive() raises too
            raise self.closed or ClosedError("the client is closed")
        self._taken(item)
        if self._paused and len(received) <= _RESUME_RECEIVED:
            self._paused = False
            if self.conn is not None:
                self.conn.resume_reading()
        return item

    def _taken(self, message: Message) -> None:
        """The application took ``message``: it is in hand until it asks for the next."""
        if not self.ack_wanted:
            self._want_ack()
        if self._stale:
            self._stale -= 1  # a previous session's: nothing to acknowledge or record
        else:
            self.busy_seq = message.seq
            if self.on_taken is not None:
                self.on_taken()

    def _done_with_busy(self) -> None:
        """The application asks for another message: it is done with the one it took before,
        which may now be acknowledged."""
        if self.busy_seq is not None:
            self.busy_seq = None
            if not self.ack_wanted:
                self._want_ack()

    def done_seq(self) -> int:
        """The ``seq`` up to which the application is done with every message: before the
        one it is handling, else before the oldest one waiting, else all received. (For an
        application that takes one message at a time.)"""
        if self.busy_seq is not None:
            return self.busy_seq - 1
        head = self._received.seq_at(self._stale)
        last = self.session.inbox.last_seq
        return last if head is None else min(head - 1, last)

    # -- connections ------------------------------------------------------------------------------

    def attach(self, conn: ClientConnection, *, resumed: bool, rooms: list[str]) -> None:
        """``conn`` was welcomed: send what the session says comes first (rooms joined again
        for a new session, then every unanswered frame)."""
        self.conn = conn
        if not resumed:
            self._stale = len(self._received)  # numbering starts over behind them
        for frame in self.session.attach(resumed=resumed, rooms=rooms):
            conn.send_frame(frame)
        if self._waiters or self._flushes:
            conn.ping()
        if self._paused:
            conn.pause_reading()

    def events_received(self, conn: ClientConnection, events: list[Event]) -> None:
        if conn is not self.conn:
            return
        received = self._received
        append = received.items.append  # then one wake() for the read, not one per message
        for event in self.session.events_received(events):
            if type(event) is Message:
                append(event)
            elif type(event) is Acknowledged:
                if self._waiters:
                    for ref in event.ids:
                        self._answered(ref, None)
            elif type(event) is FlushCompleted:
                self._flush_completed(event.flush)
            else:
                self._rare_event_received(conn, event)
        received.wake()
        if not self._space.is_set() and not self.outbox.full:
            self._space.set()
        if not self.ack_wanted:
            # Replies and skipped messages count as taken; the write after this read checks.
            inbox = self.session.inbox
            if inbox.last_seq > inbox.acked:
                self.ack_wanted = True
        if not self._paused and len(self._received) >= MAX_RECEIVED:
            self._paused = True
            conn.pause_reading()

    def queue_ack(self, conn: ClientConnection) -> None:
        """The connection is about to write: queue the cumulative ``ack`` of everything the
        application is done with since the last one (one per write, so at most one per
        iteration)."""
        self.ack_wanted = False
        if conn is not self.conn:
            return
        # Up to the message the application is handling, or else the oldest it has not taken:
        # a process killed while it handles a message gets that message again on resume.
        busy = self.busy_seq
        seq = self.session.ack_due(busy if busy is not None else self._received.seq_at(self._stale))
        if seq is not None:
            conn.core.send(Ack(seq=seq))

    def _want_ack(self) -> None:
        """The application took a message: have the connection write (and ack) soon."""
        self.ack_wanted = True
        conn = self.conn
        if conn is not None:
            conn.flush_soon()

    def _rare_event_received(self, conn: ClientConnection, event: SessionEvent) -> None:
        if type(event) is ReplyReceived:
            future = self._requests.pop(event.token, None)
            if future is not None and not future.done():
                future.set_result(event.message)
        elif type(event) is Answered:
            self._answered(event.ref, event.names)
        elif type(event) is Refused:
            error = RejectedError(event.code, event.message, ids=(event.ref,))
            if not self._answered(event.ref, None, error):
                self._log.warning(
                    "message_rejected", id=event.ref, code=error.code, reason=error.message
                )
        elif type(event) is Presence:
            for stream in self.presence_streams:
                stream.put(event)
        elif type(event) is Error:
            if event.code in FATAL_CODES:
                conn.reason = conn.reason or event.code
            self._log.warning("server_error", code=event.code, reason=event.message)
        elif type(event) is Bye:
            conn.reason = conn.reason or event.reason or "bye"
        elif type(event) is PongReceived:
            self.rtt = event.rtt
        elif type(event) is FrameRejected:
            self._log.warning("frame_rejected", code=event.error.code, reason=event.error.message)
        elif type(event) is UndecodableMessage:
            self._log.warning("message_undecodable", seq=event.seq, reason=event.reason)
            if self.on_skipped is not None:
                self.on_skipped(MessageSkipped(event.seq, event.reason))

    def connection_closed(self, conn: ClientConnection, reason: str) -> None:
        if conn is self.conn:
            self.conn = None

    def close(self, error: ClosedError) -> None:
        """Closed for good: every waiter gets ``error``, receive() drains then raises it."""
        self.closed = error
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort("client_closed")
        waiting = [*self._waiters.values(), *self._requests.values(), *self._flushes.values()]
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

    def _answered(self, ref: str, result: Any, error: RejectedError | None = None) -> bool:
        """Resolve the waiter for request ``ref``, if any; False when nobody waited."""
        future = self._waiters.pop(ref, None)
        if future is None:
            return False
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        return True

    def _flush_completed(self, flush: Flush) -> None:
        future = self._flushes.get(flush)
        if future is not None and not future.done():
            error = flush.error()
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
