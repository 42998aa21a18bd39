"""Where sessions outlive the process: the session store behind one small interface.

The broker tells the store what happened (a session made, resumed, detached or ended, a room
joined or left, a message accepted for its recipients, an ack, a client message id seen);
the server asks it, at start, for everything kept. Two implementations:

- :class:`MemoryStore`, the default: keeps nothing; every call is a no-op and
  :meth:`~SessionStore.after_commit` runs its callback at once, so today's path pays nothing.
- :class:`SqliteStore`: an SQLite file in WAL mode, written by one thread of its own.

Theory of operation (SqliteStore). The calls run on the event loop and only append to the
current :class:`~securemsg.server.storefile.Batch`; the first call of a loop iteration
schedules a hand-over for the next one, so everything a loop iteration did goes into one
transaction (group commit). The hand-over is a ``queue.Queue(maxsize=1)``, the only thing
shared with the writer thread; the thread tells the loop a batch is committed with
``call_soon_threadsafe``, and only then are that batch's ``after_commit`` callbacks run
(for instance the acks of the publishes in it). The loop never waits for the thread: when
the queue is full (one batch committing, one waiting) the loop keeps adding to its current
batch, which is handed over, larger, as soon as the thread takes the waiting one. So a slow
disk makes batches bigger, not the loop slower; what bounds the batch is that nothing in it
is acknowledged until it is committed, and clients stop at ``max_outbox`` unacknowledged
messages. :attr:`SqliteStore.backlog` counts what is not committed yet, for a server that
wants to pause reading past some size.

If a commit fails (disk full, I/O error) the store stops: no callback runs any more (nothing
more is acknowledged), ``wait_committed`` raises :class:`~securemsg.errors.StoreError`, and
``on_failure`` is called once with it so the server can log and stop.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, cast

from securemsg.errors import StoreError
from securemsg.server import storefile
from securemsg.server.storefile import Batch, StoredSession, StoreSync

__all__ = ["MemoryStore", "SessionStore", "SqliteStore", "StoreSync", "StoredSession"]

_STOP: Final = object()
#: Seconds between returns of free pages and WAL checkpoints, at most (checked per commit).
_MAINTAIN_INTERVAL: Final = 5.0


class SessionStore(Protocol):
    """What the broker and the server call. Session ids are the broker's (``s12``)."""

    #: True when the store keeps anything (the broker may skip building arguments if not).
    durable: bool

    async def open(self) -> list[StoredSession]:
        """Open (or create) the store; every kept session, to rebuild the broker from."""

    def session_created(self, sid: str, *, name: str, token: str) -> None: ...

    def session_attached(self, sid: str) -> None:
        """A connection resumed the session: it no longer expires."""

    def session_detached(self, sid: str, *, expires_at: float) -> None:
        """Its connection is gone; it expires at wall-clock ``expires_at`` (``time.time()``)."""

    def session_ended(self, sid: str) -> None:
        """Ended (bye, expiry, overflow, taken over): forget it and its pending messages."""

    def joined(self, sid: str, room_filter: str) -> None: ...

    def left(self, sid: str, room_filter: str) -> None: ...

    def message_accepted(self, prefix: bytes, recipients: Sequence[tuple[str, int]]) -> None:
        """A message (its shared prefix) numbered ``seq`` for each (session id, seq)."""

    def acked(self, sid: str, seq: int) -> None:
        """Cumulative ack: the session's messages up to ``seq`` are delivered."""

    def id_recorded(self, sid: str, msg_id: str) -> None:
        """A client message id entered the session's dedup window."""

    def after_commit(self, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` on the loop once everything handed over so far is
        committed (at once for the memory store)."""

    async def wait_committed(self) -> None:
        """Return once everything handed over so far is committed."""

    async def close(self) -> None:
        """Commit what is pending and close; idempotent."""


class MemoryStore:
    """Today's behaviour: sessions live in the broker's memory only."""

    durable = False

    async def open(self) -> list[StoredSession]:
        return []

    def session_created(self, sid: str, *, name: str, token: str) -> None:
        pass

    def session_attached(self, sid: str) -> None:
        pass

    def session_detached(self, sid: str, *, expires_at: float) -> None:
        pass

    def session_ended(self, sid: str) -> None:
        pass

    def joined(self, sid: str, room_filter: str) -> None:
        pass

    def left(self, sid: str, room_filter: str) -> None:
        pass

    def message_accepted(self, prefix: bytes, recipients: Sequence[tuple[str, int]]) -> None:
        pass

    def acked(self, sid: str, seq: int) -> None:
        pass

    def id_recorded(self, sid: str, msg_id: str) -> None:
        pass

    def after_commit(self, callback: Callable[..., object], *args: Any) -> None:
        callback(*args)

    async def wait_committed(self) -> None:
        return

    async def close(self) -> None:
        return


_Callbacks = list[tuple[Callable[..., object], tuple[Any, ...]]]


class SqliteStore:
    """Sessions and unacknowledged messages in an SQLite file (see the module docstring)."""

    durable = True

    def __init__(
        self,
        path: str,
        *,
        sync: StoreSync = "normal",
        dedup_window: int = 10_000,
        on_failure: Callable[[StoreError], None] | None = None,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.sync = sync
        self.dedup_window = dedup_window
        self._on_failure = on_failure
        self._trace = trace  # called with each SQL statement, on the writer thread (tests)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._batch = Batch()
        self._callbacks: _Callbacks = []
        self._scheduled = False
        self._batches = 0  # batches handed over
        #: Callbacks of the batches handed over and not yet committed, oldest first.
        self._inflight: deque[tuple[int, _Callbacks, int]] = deque()
        self._next_message = 1
        self._id_counts: dict[str, int] = {}
        self._error: StoreError | None = None
        self._closing = False
        self._closed: asyncio.Future[None] | None = None

    @property
    def backlog(self) -> int:
        """Operations handed to the store and not yet committed."""
        return len(self._batch) + sum(size for _, _, size in self._inflight)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> list[StoredSession]:
        loop = self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[storefile.Contents] = loop.create_future()
        self._closed = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="securemsg-store", daemon=True
        )
        self._thread.start()
        contents = await opened
        self._next_message = contents.next_message
        self._id_counts = contents.id_counts
        return contents.sessions

    async def close(self) -> None:
        if self._closing or self._closed is None:
            if self._closed is not None:
                await asyncio.shield(self._closed)
            return
        self._closing = True
        if self._error is None:
            await self.wait_committed()
            # Nothing is in flight now; should a late call have handed over a batch, the
            # put waits for the thread to take it, off the loop.
            await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.shield(self._closed)

    # -- the broker's events --------------------------------------------------------------------

    def session_created(self, sid: str, *, name: str, token: str) -> None:
        self._id_counts.pop(sid, None)
        self._batch.sessions.append((sid, name, token))
        self._changed()

    def session_attached(self, sid: str) -> None:
        self._batch.changes.append((storefile.DETACH, (None, sid)))
        self._changed()

    def session_detached(self, sid: str, *, expires_at: float) -> None:
        self._batch.changes.append((storefile.DETACH, (expires_at, sid)))
        self._changed()

    def session_ended(self, sid: str) -> None:
        self._id_counts.pop(sid, None)
        self._batch.acks.pop(sid, None)
        self._batch.ends.append((sid,))
        self._changed()

    def joined(self, sid: str, room_filter: str) -> None:
        self._batch.changes.append((storefile.JOIN, (sid, room_filter)))
        self._changed()

    def left(self, sid: str, room_filter: str) -> None:
        self._batch.changes.append((storefile.LEAVE, (sid, room_filter)))
        self._changed()

    def message_accepted(self, prefix: bytes, recipients: Sequence[tuple[str, int]]) -> None:
        if not recipients:
            return
        batch = self._batch
        if len(recipients) == 1:
            sid, seq = recipients[0]
            batch.solo.append((sid, seq, prefix))
        else:
            message = self._next_message
            self._next_message = message + 1
            batch.messages.append((message, prefix, len(recipients)))
            batch.refs.extend([(sid, seq, message) for sid, seq in recipients])
        self._changed()

    def acked(self, sid: str, seq: int) -> None:
        acks = self._batch.acks
        if acks.get(sid, 0) < seq:
            acks[sid] = seq
            self._changed()

    def id_recorded(self, sid: str, msg_id: str) -> None:
        n = self._id_counts.get(sid, 0) + 1
        self._id_counts[sid] = n
        batch = self._batch
        batch.ids.append((sid, n, msg_id))
        if n % self.dedup_window == 0:
            # Keep the last window ids (at most twice that in between), as RecentIds does.
            batch.prunes.append((sid, n - self.dedup_window))
        self._changed()

    # -- commits ------------------------------------------------------------------------------

    def after_commit(self, callback: Callable[..., object], *args: Any) -> None:
        if self._error is not None:
            return
        if len(self._batch) == 0 and not self._callbacks:
            if not self._inflight:
                callback(*args)  # everything handed over is committed already
                return
            self._inflight[-1][1].append((callback, args))
            return
        self._callbacks.append((callback, args))

    async def wait_committed(self) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self.after_commit(_resolve, done)
        try:
            await asyncio.shield(done)
        finally:
            if self._error is not None:
                raise self._error

    def _changed(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        self._scheduled = False
        batch = self._batch
        if self._error is not None or (len(batch) == 0 and not self._callbacks):
            return
        number = self._batches + 1
        try:
            self._queue.put_nowait((number, batch))
        except queue.Full:
            return  # the writer takes it with what comes next, after its current commit
        self._batches = number
        self._inflight.append((number, self._callbacks, len(batch)))
        self._batch = Batch()
        self._callbacks = []

    def _committed(self, number: int, error: StoreError | None) -> None:
        """On the loop: the writer finished batch ``number``."""
        if self._error is not None:
            return
        if error is not None:
            self._fail(error)
            return
        done, callbacks, _ = self._inflight.popleft()
        assert done == number, (done, number)
        self._hand_over()  # the queue has room again
        for callback, args in callbacks:
            callback(*args)

    def _fail(self, error: StoreError) -> None:
        self._error = error
        dropped = [entry for _, callbacks, _ in self._inflight for entry in callbacks]
        dropped += self._callbacks
        self._inflight.clear()
        self._callbacks = []
        for callback, args in dropped:
            if callback is _resolve:  # a wait_committed: it raises instead
                _reject(args[0], error)
        if self._on_failure is not None:
            self._on_failure(error)

    # -- the writer thread --------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[storefile.Contents]) -> None:
        try:
            conn = storefile.open_file(self.path, sync=self.sync, trace=self._trace)
            try:
                contents = storefile.load(conn)
            except sqlite3.Error as exc:
                conn.close()
                raise StoreError(f"store {self.path}: cannot read it ({exc})") from exc
        except StoreError as exc:
            self._tell(_reject, opened, exc)
            self._tell(_resolve, self._closed)
            return
        self._tell(_resolve, opened, contents)
        try:
            self._write(conn)
        finally:
            storefile.close_file(conn)
            self._tell(_resolve, self._closed)

    def _write(self, conn: sqlite3.Connection) -> None:
        maintained = time.monotonic()
        dirty = False
        while True:
            try:
                item = self._queue.get(timeout=_MAINTAIN_INTERVAL)
            except queue.Empty:
                # Idle: a checkpoint also syncs (under NORMAL) what the last commits wrote.
                if dirty:
                    dirty = False
                    maintained = time.monotonic()
                    self._maintain(conn)
                continue
            if item is _STOP:
                return
            number, batch = cast("tuple[int, Batch]", item)
            try:
                storefile.apply_batch(conn, batch)
            except sqlite3.Error as exc:
                error = StoreError(f"store {self.path}: a commit failed ({exc})")
                self._tell(self._committed, number, error)
                return
            self._tell(self._committed, number, None)
            dirty = True
            if time.monotonic() - maintained > _MAINTAIN_INTERVAL:
                dirty = False
                maintained = time.monotonic()
                self._maintain(conn)

    @staticmethod
    def _maintain(conn: sqlite3.Connection) -> None:
        try:
            storefile.maintain(conn)
        except sqlite3.Error:
            pass  # upkeep only; the next commit reports a real fault

    def _tell(self, callback: Callable[..., object], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more


def _resolve(future: asyncio.Future[Any] | None, value: Any = None) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
