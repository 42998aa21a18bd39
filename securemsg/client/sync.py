"""The blocking client: the asyncio :class:`~securemsg.client.client.Client` without ``await``.

::

    with securemsg.sync.connect("localhost", ca="certs/ca.pem", name="alice") as client:
        client.join("chat")
        client.publish("chat", "hello")
        for message in client:
            print(message.sender, message.body)

Each :class:`SyncClient` runs its asyncio client on one daemon thread with its own event
loop; every method hands a coroutine to that loop (``run_coroutine_threadsafe``) and waits
for the result, so any number of threads may call it at once. The exception is
``publish()`` without ``confirm``, which needs no answer: it checks and encodes the message
in the caller's thread and hands it over without waiting (see :class:`_Handover`). No wait
is unbounded by accident: a call given a timeout raises :class:`securemsg.TimeoutError`
shortly after it, a call whose loop died raises :class:`ClosedError`, ``close()`` is
bounded, and at interpreter exit open clients are closed within a second or two (the thread
is a daemon, so exit never waits for it).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import msgspec
import structlog

from securemsg.client import client as aio
from securemsg.client.client import check_room
from securemsg.client.mailbox import Deadline
from securemsg.client.types import ClientState, Message, Presence, StateChange
from securemsg.config import ClientConfig
from securemsg.core.messages import encode_body
from securemsg.errors import ClosedError, TimeoutError
from securemsg.runner import loop_factory

__all__ = ["SyncClient", "connect"]

T = TypeVar("T")

#: Publishes handed over to the loop thread and not yet in the client's outbox.
_MAX_HANDED_OVER: Final = 1024
#: Extra time a call with a timeout waits for the loop to report that timeout itself.
_GRACE: Final = 1.0
#: How often a wait without a timeout checks that the loop thread is still alive.
_POLL: Final = 0.5
_EXIT_TIMEOUT: Final = 1.0

_open_clients: weakref.WeakSet[SyncClient] = weakref.WeakSet()


class _LoopThread:
    """An event loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = loop_factory()()  # uvloop when installed
        self._thread = threading.Thread(target=self._main, name="securemsg-client", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=_EXIT_TIMEOUT))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the loop and wait for its result, within ``timeout`` + grace."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a SyncClient method was called from its own event loop thread")
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise ClosedError("the client is closed") from None
        try:
            return self._wait(future, timeout)
        except BaseException:
            future.cancel()
            raise

    def _wait(self, future: concurrent.futures.Future[T], timeout: float | None) -> T:
        limit = None if timeout is None else timeout + _GRACE
        waited = 0.0
        while True:
            step = _POLL if limit is None else min(_POLL, max(limit - waited, 0.0))
            done, _ = concurrent.futures.wait([future], timeout=step)
            if done:
                if future.cancelled():  # the loop stopped under it
                    raise ClosedError("the client is closed")
                return future.result()
            waited += step
            if not self.alive:
                raise ClosedError("the client's event loop thread has stopped")
            if limit is not None and waited >= limit:
                raise TimeoutError(f"the call did not complete within {timeout:g} s")

    def stop(self, timeout: float) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a SyncClient cannot be closed from its own event loop thread")
        if self.alive:
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


class _Handover:
    """``publish()`` without ``confirm`` from any thread to the loop: in order, bounded, and
    without waiting for the loop thread.

    Waiting for the loop thread on every message (two thread wake-ups each) held a blocking
    publisher to a few thousand messages per second. Instead the caller checks the room and
    encodes the body itself, so a bad message still raises at once, and hands the message
    over; the loop puts hand-overs into the outbox in the order they came, waiting for room
    there. At most ``_MAX_HANDED_OVER`` are in between: a caller past that waits. A failure
    on the loop's side (the client closed meanwhile, a message over the server's
    ``max_frame``) is raised by the next call that sends or flushes. Calls that send go
    after the hand-overs before them (:meth:`then`), so the order of calls is kept.
    """

    def __init__(self, thread: _LoopThread, client: aio.Client) -> None:
        self._thread = thread
        self._client = client
        self._free = threading.BoundedSemaphore(_MAX_HANDED_OVER)
        self._queue: deque[tuple[str, msgspec.Raw]] = deque()  # the loop thread's
        self._drainer: asyncio.Task[None] | None = None  # the loop thread's
        self._failure: BaseException | None = None
        self._failure_lock = threading.Lock()  # set on the loop thread, taken on the caller's

    def raise_failure(self) -> None:
        if self._failure is None:  # the common case, without the lock
            return
        with self._failure_lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def hand_over(self, room: str, raw: msgspec.Raw, timeout: float | None) -> None:
        """Called in the caller's thread."""
        if not self._free.acquire(timeout=timeout):
            raise TimeoutError(f"publish to {room!r} did not complete within {timeout:g} s")
        try:
            self._thread.loop.call_soon_threadsafe(self._arrived, room, raw)
        except RuntimeError:  # the loop is closed
            self._free.release()
            raise ClosedError("the client is closed") from None

    async def drained(self) -> None:
        """Return once every message handed over so far is in the outbox (or failed)."""
        while self._drainer is not None:
            # Shielded: a flush that times out must not cancel the publishes it waited for.
            await asyncio.shield(self._drainer)

    async def then(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``, once every message handed over before it is in the outbox."""
        try:
            await self.drained()
        except BaseException:
            coro.close()
            raise
        return await coro

    def _arrived(self, room: str, raw: msgspec.Raw) -> None:
        self._queue.append((room, raw))
        if self._drainer is None:
            self._drainer = self._thread.loop.create_task(self._drain())

    async def _drain(self) -> None:
        queue = self._queue
        try:
            while queue:
                room, raw = queue[0]
                try:
                    # Returns at once while the outbox has room; otherwise waits for it.
                    await self._client._publish_encoded(room, raw)
                except Exception as exc:  # the caller learns of it on its next call
                    with self._failure_lock:
                        if self._failure is None:
                            self._failure = exc
                finally:
                    queue.popleft()
                    self._free.release()
        finally:
            self._drainer = None


class _SyncStream(Generic[T]):
    """A blocking iterator over one of the client's event streams."""

    def __init__(self, thread: _LoopThread, stream: Any) -> None:
        self._thread = thread
        self._stream = stream

    def __iter__(self) -> _SyncStream[T]:
        return self

    def __next__(self) -> T:
        try:
            result: T = self._thread.run(self._stream.__anext__(), None)
        except (StopAsyncIteration, ClosedError):
            raise StopIteration from None
        return result


class SyncClient:
    """The blocking twin of :class:`securemsg.client.client.Client`; made by :func:`connect`."""

    def __init__(self, thread: _LoopThread, client: aio.Client) -> None:
        self._thread = thread
        self._client = client
        self._handover = _Handover(thread, client)
        _open_clients.add(self)

    def __repr__(self) -> str:
        return f"<SyncClient {self._client.name!r} {self._client.state.value}>"

    @property
    def state(self) -> ClientState:
        return self._client.state

    @property
    def name(self) -> str | None:
        return self._client.name

    @property
    def session(self) -> str | None:
        return self._client.session

    @property
    def rtt(self) -> float | None:
        return self._client.rtt

    @property
    def address(self) -> str:
        """The ``host:port`` of the server connected to (or being tried)."""
        return self._client.address

    @property
    def servers(self) -> list[str]:
        """Every server this client would try, in order (given, then learned)."""
        return self._client.servers

    @property
    def client(self) -> aio.Client:
        """The asyncio client underneath (its methods must run on its own loop)."""
        return self._client

    def join(self, room: str, *, timeout: float | None = None) -> None:
        self._send(self._client.join(room, timeout=timeout), timeout)

    def leave(self, room: str, *, timeout: float | None = None) -> None:
        self._send(self._client.leave(room, timeout=timeout), timeout)

    def who(self, room: str, *, timeout: float | None = None) -> list[str]:
        return self._thread.run(self._client.who(room, timeout=timeout), timeout)

    def publish(
        self, room: str, body: Any, *, confirm: bool = False, timeout: float | None = None
    ) -> None:
        """Send ``body`` to ``room``. Without ``confirm`` it returns once the message is
        handed to the client's thread (a failure there is raised by the next call that
        sends or flushes); with ``confirm``, once the server acknowledged it. Every call
        that sends keeps its place after the messages handed over before it."""
        if confirm:
            self._send(self._client.publish(room, body, confirm=True, timeout=timeout), timeout)
            return
        self._handover.raise_failure()
        if self._client.state is ClientState.CLOSED or not self._thread.alive:
            raise ClosedError(str(self._client.failure or "the client is closed"))
        check_room(room)
        self._handover.hand_over(room, encode_body(body), timeout)

    def direct(
        self, name: str, body: Any, *, confirm: bool = False, timeout: float | None = None
    ) -> None:
        self._send(self._client.direct(name, body, confirm=confirm, timeout=timeout), timeout)

    def request(self, room: str, body: Any, timeout: float = 10.0) -> Message:
        return self._send(self._client.request(room, body, timeout), timeout)

    def reply(
        self, message: Message, body: Any, *, confirm: bool = False, timeout: float | None = None
    ) -> None:
        self._send(self._client.reply(message, body, confirm=confirm, timeout=timeout), timeout)

    def _send(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run a call that sends, after the publishes handed over before it: order is kept."""
        self._handover.raise_failure()
        return self._thread.run(self._handover.then(coro), timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every message sent so far is acknowledged by the server; as the asyncio
        client's ``flush``, raises :class:`RejectedError` when it refused any of them."""
        self._handover.raise_failure()
        self._thread.run(self._flush(timeout), timeout)
        self._handover.raise_failure()

    async def _flush(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with Deadline(timeout, "flush"):
            await self._handover.drained()
        left = None if timeout is None else max(0.0, timeout - (loop.time() - start))
        await self._client.flush(left)

    def receive(self, timeout: float | None = None) -> Message:
        return self._thread.run(self._client.receive(timeout), timeout)

    def __iter__(self) -> Iterator[Message]:
        """Yield messages until the client is closed (from another thread, say)."""
        while True:
            try:
                yield self._thread.run(self._client.__anext__(), None)
            except StopAsyncIteration:
                return
            except ClosedError:
                if self._client.failure is None:
                    return
                raise

    def state_changes(self) -> Iterator[StateChange]:
        stream = self._thread.run(_call(self._client.state_changes), _GRACE)
        return _SyncStream[StateChange](self._thread, stream)

    def presence(self) -> Iterator[Presence]:
        stream = self._thread.run(_call(self._client.presence), _GRACE)
        return _SyncStream[Presence](self._thread, stream)

    def close(self, timeout: float = 5.0) -> None:
        """Flush, say bye and close within ``timeout``, then stop the loop thread. Then
        raises what failed after a ``publish()`` was handed over and no later call raised
        (a message over the server's ``max_frame``, say): it was not sent."""
        _open_clients.discard(self)
        try:
            if self._thread.alive:
                self._thread.run(self._close(timeout), timeout)
        except (TimeoutError, ClosedError):
            pass
        finally:
            self._thread.stop(_GRACE)
        self._handover.raise_failure()

    async def _close(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # What was handed over goes into the outbox first, so that close() flushes it too.
        with contextlib.suppress(TimeoutError):
            async with Deadline(timeout, "close"):
                await self._handover.drained()
        await self._client.close(max(0.0, timeout - (loop.time() - start)))

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception as failure:
            if exc is None:
                raise
            # The error that ended the block stays the one raised; this one rides along.
            exc.add_note(f"close() also found: {type(failure).__name__}: {failure}")


async def _call(function: Any) -> Any:
    return function()


def connect(
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    name: str | None = None,
    token: str | None = None,
    retry: bool = False,
    config: ClientConfig | None = None,
    **options: Any,
) -> SyncClient:
    """Connect and return a :class:`SyncClient`; arguments as :func:`securemsg.connect`.

    Blocks for at most ``connect_timeout`` per address (plus a little), or with
    ``retry=True`` until connected, out of ``max_attempts`` or interrupted.
    """
    connector = aio.connect(
        host,
        port,
        ca=ca,
        cert=cert,
        key=key,
        name=name,
        token=token,
        retry=retry,
        config=config,
        **options,
    )
    thread = _LoopThread()
    try:
        config = connector.config
        timeout = None if retry else config.connect_timeout * len(config.addresses())
        client = thread.run(connector.open(), timeout)
    except BaseException:
        thread.stop(_GRACE)
        raise
    return SyncClient(thread, client)


@atexit.register
def _close_at_exit() -> None:
    for client in list(_open_clients):
        try:
            client.close(_EXIT_TIMEOUT)
        except Exception as failure:  # at exit nobody can catch it: say so, close the rest
            structlog.get_logger("securemsg.client.sync").error(
                "publish_failed", error=f"{type(failure).__name__}: {failure}"
            )
