"""The ``client``, ``send`` and ``listen`` commands, built on :mod:`securemsg.client.client`.

``cli.py`` parses the arguments and calls :func:`run_client`, :func:`run_send` or
:func:`run_listen`; this module turns a :class:`~securemsg.config.ClientConfig` into a
connected client and a process's worth of behaviour:

- ``send``: one message, confirmed by the server's acknowledgement, exit 0.
- ``listen``: print the messages of some rooms, one line each, flushed per line (it is used
  in pipes); ``--count N`` exits after N. After a reconnect that could not resume the
  session, messages may be missing: a line on stderr says so, and with ``--json`` a
  ``{"gap": {...}}`` object on stdout, between the messages before and after it.
- ``client`` without a terminal (or with ``--json``): every stdin line is published to the
  first room and every message received goes to stdout; at EOF the client waits (bounded)
  until the server acknowledged everything and exits 0.
- ``client`` on a terminal: the interactive chat in :mod:`securemsg.cli.chat_ui`.

Output is one line per message: ``[room] sender: body`` (``(direct) sender: body`` for a
direct), with control characters escaped so a peer cannot drive the terminal; or, with
``--json``, one object a line with ``room``, ``from``, ``to``, ``body``, ``seq`` and ``ts``.
Every user mistake surfaces as a :class:`~securemsg.errors.SecureMsgError` with one
sentence, which ``cli.main`` prints.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final

import msgspec

from securemsg.cli.client_common import (
    check_room,
    format_message,
    message_record,
    open_client,
    parse_body,
    with_default_name,
)
from securemsg.client.client import Client, Message, Reconnected
from securemsg.config import ClientConfig
from securemsg.core.messages import ErrorCode, is_valid_name, is_valid_room
from securemsg.errors import ConfigError, RejectedError, SecureMsgError
from securemsg.runner import run

__all__ = ["FLUSH_TIMEOUT", "run_client", "run_listen", "run_send"]

#: Longest wait at stdin EOF for the server to acknowledge what was sent.
FLUSH_TIMEOUT: Final = 10.0
_READ_SIZE: Final = 65536
_STDIN_BACKLOG: Final = 64  # chunks read ahead of the publisher


def _render(message: Message, *, json_output: bool) -> str:
    if json_output:
        return msgspec.json.encode(message_record(message)).decode()
    return format_message(message)


class _StdoutClosedError(Exception):
    """The reader of our stdout went away (``listen | head -1``)."""


def _emit(line: str) -> None:
    """Write one line to stdout and flush it; :class:`_StdoutClosedError` once nobody reads."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise _StdoutClosedError from None


async def _print_messages(client: Client, *, json_output: bool, count: int | None = None) -> None:
    """Print what ``client`` receives until ``count`` messages, stdout closes or the client
    does (:class:`~securemsg.errors.ClosedError` when it gave up); and where messages may
    be missing (:func:`_report_gaps`)."""
    printed = 0
    gaps = asyncio.create_task(_report_gaps(client, json_output=json_output))
    try:
        with contextlib.suppress(_StdoutClosedError):
            async for message in client:
                _emit(_render(message, json_output=json_output))
                printed += 1
                if count is not None and printed >= count:
                    return
    finally:
        gaps.cancel()
        with contextlib.suppress(asyncio.CancelledError, _StdoutClosedError):
            await gaps


async def _report_gaps(client: Client, *, json_output: bool) -> None:
    """After each reconnect that did not resume the session (a server restart, a session
    that expired), say that messages may be missing: one line on stderr, and with
    ``--json`` a ``{"gap": {"missing": N or null, "ts": ...}}`` object on stdout."""
    async for change in client.state_changes():
        if type(change) is not Reconnected or change.resumed:
            continue
        print(
            "securemsg: reconnected without resuming the session (the server restarted or "
            "forgot it): messages sent meanwhile may be missing",
            file=sys.stderr,
            flush=True,
        )
        if json_output:
            gap = {"gap": {"missing": change.gap, "ts": time.time()}}
            _emit(msgspec.json.encode(gap).decode())


# -- send and listen -----------------------------------------------------------------------------


async def run_send(config: ClientConfig, *, room: str | None, to: str | None, message: str) -> int:
    """Send ``message`` (JSON if it parses, else a string) to ``room`` or to the client ``to``
    and return 0 once the server acknowledged it. A message over the server's ``max_frame``
    is one sentence."""
    if room is not None:
        check_room(room)
    elif to is None or not is_valid_name(to):
        raise ConfigError(f"--to {to!r}: a name is 1 to 64 letters, digits, _ . @ or -")
    body = parse_body(message)
    config = with_default_name(config)
    where = ",".join(str(address) for address in config.addresses())
    async with open_client(config) as client:
        try:
            if room is not None:
                await client.publish(room, body, confirm=True, timeout=config.connect_timeout)
            else:
                assert to is not None
                await client.direct(to, body, confirm=True, timeout=config.connect_timeout)
        except RejectedError as exc:
            if exc.code == ErrorCode.NO_SUCH_USER:
                raise SecureMsgError(f"nobody called {to!r} is connected to {where}") from None
            raise
        except ValueError as exc:  # over max_frame: found before anything is sent
            raise SecureMsgError(f"not sent: the {exc}") from None
    return 0


async def run_listen(
    config: ClientConfig, *, rooms: Sequence[str], count: int | None, json_output: bool
) -> int:
    """Join ``rooms`` and print what arrives (room messages and directs) until ``count``
    messages (forever when None); return 0."""
    for room in rooms:
        check_room(room, pattern=True)
    if count is not None and count < 1:
        raise ConfigError(f"--count {count}: the count must be at least 1")
    async with open_client(with_default_name(config)) as client:
        await _join_all(client, rooms)
        await _print_messages(client, json_output=json_output, count=count)
    return 0


async def _join_all(client: Client, rooms: Sequence[str]) -> None:
    for room in dict.fromkeys(rooms):
        await client.join(room, timeout=client.config.connect_timeout)


# -- client --------------------------------------------------------------------------------------


def run_client(config: ClientConfig, *, rooms: Sequence[str], json_output: bool) -> int:
    """The ``client`` command: the interactive chat when stdin and stdout are terminals and
    ``--json`` is not given; otherwise stdin lines in, received messages out."""
    for room in rooms:
        check_room(room, pattern=True)
    config = with_default_name(config)
    if not json_output and sys.stdin.isatty() and sys.stdout.isatty():
        from securemsg.cli.chat_ui import run_interactive

        return run_interactive(config, rooms=rooms)
    if not rooms:
        raise ConfigError(
            "client needs --room when stdin or stdout is not a terminal: stdin lines are "
            "published to the first room"
        )
    first = rooms[0]
    if not is_valid_room(first):
        raise ConfigError(
            f"--room {first!r}: the first room receives the stdin lines, so it cannot be a "
            "wildcard; put a plain room first"
        )
    return run(_pipe_client(config, rooms=rooms, json_output=json_output))


async def _pipe_client(config: ClientConfig, *, rooms: Sequence[str], json_output: bool) -> int:
    async with open_client(config) as client:
        await _join_all(client, rooms)
        printer = asyncio.create_task(_print_messages(client, json_output=json_output))
        publisher = asyncio.create_task(_publish_stdin(client, rooms[0]))
        try:
            await asyncio.wait([printer, publisher], return_when=asyncio.FIRST_COMPLETED)
            if not publisher.done():  # the client gave up, or stdout closed
                printer.result()
                return 0
            publisher.result()
        finally:
            for task in (printer, publisher):
                task.cancel()
            await asyncio.gather(printer, publisher, return_exceptions=True)
    return 0


async def _publish_stdin(client: Client, room: str) -> None:
    """Publish each non-empty stdin line to ``room`` (pipelined), then wait at EOF until the
    server has acknowledged them all, at most :data:`FLUSH_TIMEOUT`. A line over the
    server's ``max_frame`` ends it with one sentence (the lines before it still go)."""
    number = 0
    async for line in stdin_lines():
        number += 1
        if line:
            try:
                await client.publish(room, line)
            except ValueError as exc:
                raise SecureMsgError(f"stdin line {number} not sent: the {exc}") from None
    await client.flush(FLUSH_TIMEOUT)


async def stdin_lines() -> AsyncIterator[str]:
    """The lines of stdin without their line ends, read by a daemon thread so the event loop
    never blocks and exit never waits for a read (stdin may be a pipe, a file or a terminal).
    The thread reads at most :data:`_STDIN_BACKLOG` chunks ahead of the consumer.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    room = threading.Semaphore(_STDIN_BACKLOG)

    def read() -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody reads
            try:
                fd = sys.stdin.fileno()
                while True:
                    room.acquire()
                    chunk = os.read(fd, _READ_SIZE)
                    loop.call_soon_threadsafe(chunks.put_nowait, chunk)
                    if not chunk:
                        return
            except (OSError, ValueError):  # stdin is closed or unreadable: treat it as EOF
                loop.call_soon_threadsafe(chunks.put_nowait, b"")

    threading.Thread(target=read, name="securemsg-stdin", daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    while True:
        chunk = await chunks.get()
        room.release()
        pending += decoder.decode(chunk, final=not chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
        if not chunk:
            if pending:
                yield pending.removesuffix("\r")
            return
