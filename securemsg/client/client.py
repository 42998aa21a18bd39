"""The asyncio client: :func:`connect` and :class:`Client`.

A :class:`Client` keeps one session across many connections, to one server or to any node
of a cluster (several addresses, and those the nodes advertise: :mod:`securemsg.core.address`). Its
:class:`~securemsg.client.mailbox.Mailbox` holds the waiters and the messages received and not
yet read, over the sans-I/O :class:`~securemsg.core.client_session.ClientSession` (what was
sent and not yet answered, what to resend, what to acknowledge); each
:class:`~securemsg.client.connection.ClientConnection` carries one TLS connection. One
background task, :meth:`Client._run`, waits for the connection to end and reconnects on the
backoff schedule, resuming the session (``hello`` with session and ``last_seq``); when the
server no longer knows the session, the client joins its rooms again and reports the gap in
a :class:`Reconnected` event.

::

    client = await securemsg.connect("localhost", ca="certs/ca.pem", name="alice")
    # or a cluster: connect(["node1:7443", "node2:7443"]) or connect("node1:7443,node2:7443")
    await client.join("chat")
    await client.publish("chat", {"text": "hello"})
    async for message in client:
        print(message.sender, message.body)
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import ssl
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from types import TracebackType
from typing import Any, Final

import msgspec
import structlog

from securemsg.client.connection import ClientConnection, open_connection, should_retry
from securemsg.client.mailbox import Deadline, EventStream, Mailbox
from securemsg.client.sessionfile import SessionFile, keep, open_session_file
from securemsg.client.types import (
    ClientState,
    Closed,
    Disconnected,
    Message,
    Presence,
    Reconnected,
    Reconnecting,
    StateChange,
)
from securemsg.config import ClientConfig, load_config
from securemsg.core.address import AddressBook, moves_at_once, parse_address
from securemsg.core.backoff import backoff_delays
from securemsg.core.messages import (
    Direct,
    Join,
    Leave,
    MemberNames,
    Publish,
    Who,
    encode_body,
    is_valid_name,
    is_valid_room,
    is_valid_room_filter,
)
from securemsg.errors import (
    ClosedError,
    ConfigError,
    ConnectError,
    RejectedError,
    StoreError,
    TimeoutError,
    TLSError,
)
from securemsg.tls.contexts import client_context

__all__ = [
    "Client",
    "ClientState",
    "Closed",
    "Disconnected",
    "Message",
    "Presence",
    "Reconnected",
    "Reconnecting",
    "StateChange",
    "connect",
]

#: A connection that stayed up this long resets the attempt count (capped by 10 x base).
_STABLE_AFTER: Final = 60.0


class connect:
    """``client = await connect(...)`` or ``async with connect(...) as client:``.

    ``host`` and ``port`` default to ``localhost`` and 7443. ``host`` may name several
    servers (the nodes of a cluster): a list ``["node1:7443", "node2:7443"]`` or one string
    ``"node1:7443,node2:7443"`` (the ``servers`` option; ``port`` is the port of those
    without one); ``"host:port"`` alone is one server. The client tries them in the order
    given, then those the nodes advertise in ``welcome``, moving to the next after each
    failed attempt (docs/operations.md, section 5). ``options`` are
    :class:`~securemsg.config.ClientConfig` field names (``reconnect_base``, ``max_outbox``,
    ``heartbeat_interval``, ``connect_timeout``, ...); keyword arguments override ``config``.
    The first connect is one attempt per address, each bounded by ``connect_timeout``, that
    raises :class:`ConnectError`, :class:`TLSError` or :class:`AuthError` with one sentence
    naming the server; ``retry=True`` retries network failures on the backoff schedule instead.
    """

    def __init__(
        self,
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
    ) -> None:
        given: dict[str, Any] = {"port": port, "ca": ca, "cert": cert, "key": key}
        if isinstance(host, str) and _is_plain_host(host):
            given["host"] = host
        elif host is not None:
            given["servers"] = host  # "h:p", several, a list: config.py splits and checks them
        given |= {"name": name, "token": token, **options}
        self.config = make_config(config, given)
        self.retry = retry
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self.open().__await__()

    async def open(self) -> Client:
        client = Client(self.config)
        await client._start(retry=self.retry)
        return client

    async def __aenter__(self) -> Client:
        self._client = await self.open()
        return self._client

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if self._client is not None:
            await self._client.close()


def make_config(config: ClientConfig | None, given: dict[str, Any]) -> ClientConfig:
    """``config`` (or the defaults) with the non-None values of ``given`` on top, validated."""
    unknown = sorted(set(given) - set(ClientConfig.__struct_fields__))
    if unknown:
        raise TypeError(f"connect() got an unexpected keyword argument {unknown[0]!r}")
    values = msgspec.structs.asdict(config) if config is not None else {}
    values.update((name, value) for name, value in given.items() if value is not None)
    return load_config(ClientConfig, env={}, overrides=values)


class Client:
    """A session with a securemsg server that reconnects by itself. Made by :func:`connect`."""

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._book = AddressBook(config.addresses())
        self._where = ",".join(str(address) for address in self._book.given)
        self._log = structlog.get_logger("securemsg.client.client").bind(server=self._where)
        self._mailbox = Mailbox(
            max_outbox=config.max_outbox,
            max_outbox_bytes=config.max_outbox_bytes,
            log=self._log,
            on_skipped=lambda skipped: self._set_state(self._state, skipped),
        )
        self._state = ClientState.CONNECTING
        self._session: str | None = None
        self._name: str | None = config.name
        self._rooms: dict[str, None] = {}
        self._state_streams: weakref.WeakSet[EventStream[StateChange]] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None
        self._closed = asyncio.Event()
        self._attempt = 0
        self._delays = backoff_delays(base=config.reconnect_base, cap=config.reconnect_cap)
        self._connected_at = 0.0
        #: Made on the first connect and kept: loading the CAs blocks the loop (tens of ms
        #: with the system store), and the files are the same on every reconnect.
        self._context: ssl.SSLContext | None = None
        self._context_files: tuple[tuple[int, int, int] | None, ...] = ()
        self._file: SessionFile | None = None
        if config.session_file is not None:
            self._file, self._name, self._session = open_session_file(
                config.session_file, name=config.name, mailbox=self._mailbox
            )
            self._config = msgspec.structs.replace(config, name=self._name)

    def __repr__(self) -> str:
        return f"<Client {self._name!r} {self._where} {self._state.value}>"

    # -- what the application can see -----------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def name(self) -> str | None:
        """The name the server knows us by (from ``welcome``)."""
        return self._name

    @property
    def session(self) -> str | None:
        """The session token, used to resume after a reconnect."""
        return self._session

    @property
    def rtt(self) -> float | None:
        """Round-trip time of the last heartbeat ping, in seconds (None before the first)."""
        return self._mailbox.rtt

    @property
    def failure(self) -> str | None:
        """Why the client closed itself (out of reconnect attempts); None otherwise."""
        return self._failure

    @property
    def config(self) -> ClientConfig:
        return self._config

    @property
    def address(self) -> str:
        """The ``host:port`` of the server connected to (or being tried)."""
        return str(self._book.current)

    @property
    def servers(self) -> list[str]:
        """Every server this client would try, in order: those given, then those learned
        from the nodes' ``welcome``."""
        return [str(address) for address in self._book.addresses]

    @property
    def unacknowledged(self) -> int:
        """Frames sent or waiting to be sent that the server has not answered yet."""
        return len(self._mailbox.outbox)

    def state_changes(self) -> AsyncIterator[StateChange]:
        """Yield :class:`Disconnected`, :class:`Reconnecting`, :class:`Reconnected` and finally
        :class:`Closed` events, from now on."""
        stream: EventStream[StateChange] = EventStream()
        if self._state is ClientState.CLOSED:
            stream.end()
        else:
            self._state_streams.add(stream)
        return stream

    def presence(self) -> AsyncIterator[Presence]:
        """Yield :class:`Presence` events of the rooms this client joined, from now on."""
        stream: EventStream[Presence] = EventStream()
        if self._state is ClientState.CLOSED:
            stream.end()
        else:
            self._mailbox.presence_streams.add(stream)
        return stream

    # -- rooms ----------------------------------------------------------------------------------

    async def join(self, room: str, *, timeout: float | None = None) -> None:
        """Join ``room`` (``*`` and ``>`` wildcards allowed); returns once the server holds
        the membership. Rooms are joined again after a reconnect that did not resume."""
        _check(is_valid_room_filter, room, "room filter")
        await self._mailbox.send(lambda i: Join(room=room, id=i), True, timeout, f"join {room!r}")
        self._rooms[room] = None

    async def leave(self, room: str, *, timeout: float | None = None) -> None:
        """Leave ``room``; :class:`RejectedError` (``not_member``) if it was not joined."""
        _check(is_valid_room_filter, room, "room filter")
        self._rooms.pop(room, None)
        await self._mailbox.send(lambda i: Leave(room=room, id=i), True, timeout, f"leave {room!r}")

    async def who(self, room: str, *, timeout: float | None = None) -> list[str]:
        """The names of the members of ``room``, sorted. When they would not fit the
        server's ``max_frame`` the server sends the first ones, and the list returned is a
        :class:`~securemsg.core.messages.MemberNames` whose ``truncated`` is True."""
        _check(is_valid_room_filter, room, "room filter")
        names = await self._mailbox.send(
            lambda i: Who(room=room, id=i), True, timeout, f"who {room!r}"
        )
        return names if type(names) is MemberNames else list(names)

    # -- sending --------------------------------------------------------------------------------

    async def publish(
        self, room: str, body: Any, *, confirm: bool = False, timeout: float | None = None
    ) -> None:
        """Send ``body`` (any JSON value) to every member of ``room`` but us.

        Returns once the message is in the outbox, waiting while the outbox is full; with
        ``confirm=True``, once the server acknowledged it. ``timeout`` bounds the whole wait
        (:class:`securemsg.TimeoutError`); the message may still be delivered after it.
        """
        check_room(room)
        raw = encode_body(body)
        mailbox = self._mailbox
        if not confirm and mailbox.closed is None and not mailbox.outbox.full:
            # The hot path: into the outbox and onto the connection, no waiting to set up.
            mailbox.submit_publish(room, raw)
            return
        await self._publish_encoded(room, raw, confirm=confirm, timeout=timeout)

    async def _publish_encoded(
        self,
        room: str,
        raw: msgspec.Raw,
        *,
        confirm: bool = False,
        timeout: float | None = None,
    ) -> None:
        """:meth:`publish` for a room already checked and a body already encoded (the
        blocking client does both in the caller's thread)."""
        mailbox = self._mailbox
        if not confirm and mailbox.closed is None and not mailbox.outbox.full:
            mailbox.submit_publish(room, raw)
            return
        await mailbox.send(
            lambda i: Publish(room=room, body=raw, id=i), confirm, timeout, f"publish to {room!r}"
        )

    async def direct(
        self, name: str, body: Any, *, confirm: bool = False, timeout: float | None = None
    ) -> None:
        """Send ``body`` to the client called ``name``; otherwise as :meth:`publish`. With
        ``confirm=True`` an unknown name raises :class:`RejectedError` (``no_such_user``)."""
        _check(is_valid_name, name, "name")
        raw = encode_body(body)
        await self._mailbox.send(
            lambda i: Direct(to=name, body=raw, id=i), confirm, timeout, f"direct to {name!r}"
        )

    async def request(self, room: str, body: Any, timeout: float = 10.0) -> Message:
        """Publish ``body`` with a fresh ``reply_to`` and return the first reply to it.

        Raises :class:`securemsg.TimeoutError` when nobody answers within ``timeout``. The
        reply never reaches :meth:`receive`; later replies to the same request are dropped.
        """
        check_room(room)
        raw = encode_body(body)
        mailbox = self._mailbox
        token, reply = mailbox.request_token()
        what = f"request to {room!r}"
        try:
            async with Deadline(timeout, what):
                await mailbox.send(
                    lambda i: Publish(room=room, body=raw, id=i, reply_to=token), False, None, what
                )
                return await reply
        finally:
            mailbox.forget_request(token)

    async def reply(
        self, message: Message, body: Any, *, confirm: bool = False, timeout: float | None = None
    ) -> None:
        """Answer a request: a direct to its sender carrying ``re`` = its ``reply_to``."""
        token = message.reply_to
        if token is None:
            raise ValueError("this message is not a request: it has no reply_to")
        raw = encode_body(body)
        await self._mailbox.send(
            lambda i: Direct(to=message.sender, body=raw, id=i, re=token),
            confirm,
            timeout,
            f"reply to {message.sender!r}",
        )

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the server has answered everything sent so far, across reconnects.

        Raises :class:`RejectedError` when it refused any of those messages (``rate_limited``,
        ``not_member``, ...): the code of the most frequent refusal, and how many were
        refused. Refused messages are not resent (they would be refused again).
        """
        if self._mailbox.closed is not None:
            raise ClosedError(str(self._mailbox.closed))
        await self._mailbox.flushed(timeout)

    # -- receiving ------------------------------------------------------------------------------

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message, room or direct. Once closed, the messages already received
        are still returned, then :class:`ClosedError` is raised."""
        message = self._mailbox.take()
        if message is not None:
            return message
        return await self._mailbox.receive(timeout)

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message:
        """Ends when the client is closed; raises :class:`ClosedError` if it gave up."""
        message = self._mailbox.take()
        if message is not None:
            return message
        try:
            return await self._mailbox.receive(None)
        except ClosedError:
            if self._failure is None:
                raise StopAsyncIteration from None
            raise

    # -- closing --------------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Flush (when connected), say bye and close, within ``timeout``; calls still waiting
        get :class:`ClosedError`. During a reconnect backoff it returns at once."""
        mailbox = self._mailbox
        if mailbox.closed is not None:
            with contextlib.suppress(builtins.TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._closed.wait()
            return
        mailbox.closed = ClosedError("the client is closed")
        end = self._loop.time() + timeout
        try:
            if mailbox.conn is not None and len(mailbox.outbox):
                # Refusals were logged (message_rejected); close() still closes.
                with contextlib.suppress(TimeoutError, ClosedError, RejectedError):
                    await mailbox.flushed(timeout)
            task = self._task
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])
            mailbox.busy_seq = None  # closing: done with the message taken last
            conn = mailbox.conn
            if conn is not None:
                # With a session file the server keeps the session for the next process.
                conn.say_bye(end_session=self._file is None)
                with contextlib.suppress(builtins.TimeoutError):
                    async with asyncio.timeout_at(end):
                        await asyncio.shield(conn.closed)
        finally:
            self._finish(None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- connection lifecycle -------------------------------------------------------------------

    async def _start(self, *, retry: bool) -> None:
        try:
            try:
                conn = await self._open_any()
            except ConnectError as exc:
                if not retry or not should_retry(exc, welcomed=False):
                    raise
                self._log.warning("connect_failed", error=str(exc))
                conn = await self._reconnect(welcomed=False)
        except BaseException:
            if self._file is not None:
                self._file.release()
            raise
        self._connected(conn, first=True)
        if self._file is not None:
            keep(self._file, self._mailbox, lambda: (self._name, self._session))
        self._task = self._loop.create_task(self._run(conn), name=f"securemsg {self._where}")

    async def _run(self, conn: ClientConnection) -> None:
        """Keep the session connected: wait for the connection to end, reconnect, repeat."""
        try:
            while True:
                reason = await asyncio.shield(conn.closed)
                self._disconnected(reason)
                conn = await self._reconnect(welcomed=True, at_once=moves_at_once(reason))
                self._connected(conn, first=False)
        except (ConnectError, ConfigError) as exc:
            self._finish(f"gave up after {self._attempt} reconnect attempts: {exc}")
        except Exception:
            self._log.exception("client_task_failed")
            self._finish("internal error (logged as client_task_failed)")

    async def _open_any(self) -> ClientConnection:
        """The first connect: one attempt at each given address in turn, without a wait in
        between (they are different servers). Raises at once what is not worth retrying
        elsewhere (:func:`should_retry`: certificates, authorization), else the error, or
        all of them in one sentence when every address failed."""
        errors: list[ConnectError] = []
        count = len(self._book.given)
        for index in range(count):
            try:
                return await self._open()
            except ConnectError as exc:
                if not should_retry(exc, welcomed=False):
                    raise
                errors.append(exc)
                if index + 1 < count:
                    self._log.warning("connect_failed", error=str(exc))
                    self._book.advance()
        if len(errors) == 1:
            raise errors[0]
        text = "; ".join(str(error) for error in errors)
        raise ConnectError(f"no server answered: {text}") from errors[-1]

    async def _reconnect(self, *, welcomed: bool, at_once: bool = False) -> ClientConnection:
        """Attempts on the backoff schedule, each at the next address, until one is
        welcomed; the first without a wait when ``at_once``. Raises the last error when out
        of attempts or when it is not worth retrying (:func:`should_retry`)."""
        limit = self._config.max_attempts
        waiting = ClientState.RECONNECTING if welcomed else ClientState.CONNECTING
        while True:
            self._attempt += 1
            address = self._book.advance()
            # An immediate attempt leaves the schedule where it was.
            delay = 0.0 if at_once else next(self._delays)
            at_once = False
            self._log.info(
                "reconnect_scheduled",
                attempt=self._attempt,
                delay=round(delay, 3),
                address=str(address),
            )
            self._set_state(waiting, Reconnecting(self._attempt, delay))
            await asyncio.sleep(delay)
            try:
                return await self._open()
            except (ConnectError, ConfigError) as exc:
                if not should_retry(exc, welcomed=welcomed) or 0 < limit <= self._attempt:
                    raise
                self._log.warning("reconnect_failed", attempt=self._attempt, error=str(exc))
                if isinstance(exc, TLSError | ConfigError):
                    self._context = None  # certificates may have been rotated: read them again

    async def _open(self) -> ClientConnection:
        config = self._config
        # Built once (loading the system CAs blocks the loop ~27 ms), again only when the
        # certificate files changed: a renewed client certificate is used on the next connect.
        files = _file_signature(config.ca, config.cert, config.key)
        if self._context is None or files != self._context_files:
            self._context = client_context(ca=config.ca, cert=config.cert, key=config.key)
            self._context_files = files
        last_seq = self._mailbox.session.last_seq
        return await open_connection(
            config,
            session=self._session,
            last_seq=last_seq,
            context=self._context,
            address=self._book.current,
        )

    def _connected(self, conn: ClientConnection, *, first: bool) -> None:
        welcome = conn.welcomed.result()
        # A first connect has nothing to join or renumber, unless a session file gave it a
        # session the server no longer knows.
        resumed = welcome.resumed or (first and self._session is None)
        if first and not resumed:
            self._log.warning("session_not_resumed", session_file=self._config.session_file)
        self._session, self._name = welcome.session, welcome.name
        if welcome.nodes:
            learned = self._book.learn(welcome.nodes, default_port=self._config.port)
            if learned:
                self._log.info("nodes_learned", nodes=[str(address) for address in learned])
        self._mailbox.session.max_frame = welcome.max_frame
        self._mailbox.attach(conn, resumed=resumed, rooms=list(self._rooms))
        config = self._config
        conn.attach(
            self._mailbox,
            interval=config.heartbeat_interval or welcome.heartbeat.interval,
            timeout=config.heartbeat_timeout or welcome.heartbeat.timeout,
        )
        self._connected_at = self._loop.time()
        if first:
            self._set_state(ClientState.CONNECTED, None)
            self._log.info("client_connected", name=welcome.name, address=self.address)
            return
        gap = 0 if welcome.resumed else None
        self._set_state(ClientState.CONNECTED, Reconnected(welcome.resumed, gap))
        self._log.info(
            "reconnected",
            name=welcome.name,
            address=self.address,
            resumed=welcome.resumed,
            attempt=self._attempt,
            resent=len(self._mailbox.outbox),
        )

    def _disconnected(self, reason: str) -> None:
        self._mailbox.conn = None
        unacked = len(self._mailbox.outbox)
        self._log.warning("connection_lost", reason=reason, unacknowledged=unacked)
        self._set_state(ClientState.RECONNECTING, Disconnected(reason))
        base = self._config.reconnect_base
        if self._loop.time() - self._connected_at >= min(10 * base, _STABLE_AFTER):
            self._attempt = 0
            self._delays = backoff_delays(base=base, cap=self._config.reconnect_cap)

    def _set_state(self, state: ClientState, event: StateChange | None) -> None:
        self._state = state
        if event is not None:
            for stream in self._state_streams:
                stream.put(event)

    def _finish(self, failure: str | None) -> None:
        """Closed for good: fail every waiter, end every iterator."""
        if self._state is ClientState.CLOSED:
            return
        self._failure = failure
        unacked = len(self._mailbox.outbox)
        if unacked:
            self._log.warning("closed_with_unacknowledged", count=unacked)
        text = "the client is closed" + (f": {failure}" if failure else "")
        self._mailbox.close(ClosedError(text))
        if self._file is not None:
            try:
                self._file.close()
            except StoreError as exc:
                self._log.error("session_file_write_failed", error=str(exc))
        self._set_state(ClientState.CLOSED, Closed(failure))
        for stream in self._state_streams:
            stream.end()
        self._closed.set()
        if failure is None:
            self._log.info("client_closed")
        else:
            self._log.error("client_closed", error=failure)


_ROOMS_SEEN_VALID = is_valid_room.seen_valid


def check_room(room: str) -> None:
    """Raise ValueError unless ``room`` is a concrete room name (cached; the publish path)."""
    # The cached check: publish runs it for every message (the cache looked at first, here).
    if not isinstance(room, str) or (room not in _ROOMS_SEEN_VALID and not is_valid_room(room)):
        raise ValueError(f"invalid room {room!r}")


def _is_plain_host(text: str) -> bool:
    """True for a host name alone (no port, no list): the ``host`` of the config, as ever."""
    try:
        return "," not in text and parse_address(text, default_port=0).port == 0
    except ValueError:
        return False


def _check(valid: Callable[[str], bool], value: str, what: str) -> None:
    if not isinstance(value, str) or not valid(value):
        raise ValueError(f"invalid {what} {value!r}")


def _file_signature(*paths: str | None) -> tuple[tuple[int, int, int] | None, ...]:
    """What tells a changed file from the one read before: inode, size, modification time."""
    signature: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            info = os.stat(path) if path else None
        except OSError:
            info = None
        signature.append(None if info is None else (info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(signature)
