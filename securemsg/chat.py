"""The ``client``, ``send`` and ``listen`` commands, built on :mod:`securemsg.client`.

``cli.py`` parses the arguments and calls :func:`run_client`, :func:`run_send` or
:func:`run_listen`; this module turns a :class:`~securemsg.config.ClientConfig` into a
connected client and a process's worth of behaviour:

- ``send``: one message, confirmed by the server's acknowledgement, exit 0.
- ``listen``: print the messages of some rooms, one line each, flushed per line (it is used
  in pipes); ``--count N`` exits after N.
- ``client`` without a terminal (or with ``--json``): every stdin line is published to the
  first room and every message received goes to stdout; at EOF the client waits (bounded)
  until the server acknowledged everything and exits 0.
- ``client`` on a terminal: the interactive chat in :mod:`securemsg.chat_ui`.

Output is one line per message: ``[room] sender: body`` (``(direct) sender: body`` for a
direct), with control characters escaped so a peer cannot drive the terminal; or, with
``--json``, one object a line with ``room``, ``from``, ``to``, ``body``, ``seq`` and ``ts``.
Every user mistake surfaces as a :class:`~securemsg.exceptions.SecureMsgError` with one
sentence, which ``cli.main`` prints.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import getpass
import os
import re
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from securemsg.client import Client, Message, connect
from securemsg.config import ClientConfig
from securemsg.exceptions import AuthError, ConfigError, RejectedError, SecureMsgError
from securemsg.messages import NAME_PATTERN, ROOM_FILTER_PATTERN, ROOM_PATTERN, ErrorCode
from securemsg.runner import run

__all__ = [
    "FLUSH_TIMEOUT",
    "certificate_identity",
    "check_room",
    "default_name",
    "format_message",
    "message_record",
    "open_client",
    "parse_body",
    "printable",
    "run_client",
    "run_listen",
    "run_send",
    "with_default_name",
]

#: Longest wait at stdin EOF for the server to acknowledge what was sent.
FLUSH_TIMEOUT: Final = 10.0
_NAME_RE: Final = re.compile(NAME_PATTERN)
_ROOM_RE: Final = re.compile(ROOM_PATTERN)
_FILTER_RE: Final = re.compile(ROOM_FILTER_PATTERN)
_NOT_NAME_CHARS: Final = re.compile(r"[^A-Za-z0-9_.@-]+")
_SUFFIX_LENGTH: Final = 5  # "-" and four hex digits
_MAX_NAME: Final = 64
# C0 and C1 controls (all but tab), DEL and the Unicode line separators: escaped on output.
_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_READ_SIZE: Final = 65536
_STDIN_BACKLOG: Final = 64  # chunks read ahead of the publisher


# -- names, rooms and bodies ---------------------------------------------------------------------


def certificate_identity(cert: str | Path) -> str | None:
    """The identity the server sees in the client certificate at ``cert``: its common name,
    else its first DNS name (as :func:`securemsg.tls.peer_identity`). None when the file
    cannot be read or parsed; :func:`securemsg.tls.client_context` reports that in words."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError):
        return None
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attribute.value, str) and attribute.value:
            return attribute.value
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    names = extension.value.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def default_name(cert: str | None = None) -> str | None:
    """The name to register as when ``--name`` is not given.

    Under mutual TLS the certificate's identity (None when it is not a valid name: the
    server then takes the identity itself); otherwise the user name plus a short random
    suffix, reduced to the characters a name may hold, so several clients can run at once.
    """
    if cert is not None:
        identity = certificate_identity(cert)
        return identity if identity is None or _NAME_RE.match(identity) else None
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no password entry
        user = ""
    base = _NOT_NAME_CHARS.sub("_", user)[: _MAX_NAME - _SUFFIX_LENGTH].strip("_") or "user"
    return f"{base}-{secrets.token_hex(2)}"


def with_default_name(config: ClientConfig) -> ClientConfig:
    """``config`` with ``name`` filled in by :func:`default_name` when it is not set."""
    if config.name is not None:
        return config
    return msgspec.structs.replace(config, name=default_name(config.cert))


def check_room(room: str, *, pattern: bool = False, option: str = "--room") -> str:
    """``room`` if it is a valid room name (a room filter with ``pattern``), else a
    :class:`ConfigError` that says what a room name may hold."""
    if (_FILTER_RE if pattern else _ROOM_RE).match(room) and len(room) <= 255:
        return room
    rule = "letters, digits, _ and - in dot-separated parts"
    if pattern:
        rule += ", with * for one part or a final > for the rest"
    raise ConfigError(f"{option} {room!r}: a room name is {rule}")


def parse_body(text: str) -> Any:
    """``text`` as a JSON value when it parses as JSON, else the string itself."""
    try:
        return msgspec.json.decode(text.encode())
    except msgspec.DecodeError:
        return text


# -- output --------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\n``): safe on a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def format_message(message: Message) -> str:
    """``[room] sender: body`` or ``(direct) sender: body``; a body that is not a string is
    shown as JSON."""
    body = message.body
    text = body if isinstance(body, str) else msgspec.json.encode(body).decode()
    where = f"[{message.room}]" if message.room is not None else "(direct)"
    return f"{where} {message.sender}: {printable(text)}"


def message_record(message: Message) -> dict[str, Any]:
    """The ``--json`` form of ``message``: room, from, to, body, seq, ts (and reply_to or re
    when set)."""
    record: dict[str, Any] = {
        "room": message.room,
        "from": message.sender,
        "to": message.to,
        "body": message.body,
        "seq": message.seq,
        "ts": message.time,
    }
    if message.reply_to is not None:
        record["reply_to"] = message.reply_to
    if message.re is not None:
        record["re"] = message.re
    return record


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
    does (:class:`~securemsg.exceptions.ClosedError` when it gave up)."""
    printed = 0
    with contextlib.suppress(_StdoutClosedError):
        async for message in client:
            _emit(_render(message, json_output=json_output))
            printed += 1
            if count is not None and printed >= count:
                return


@contextlib.asynccontextmanager
async def open_client(config: ClientConfig) -> AsyncIterator[Client]:
    """``connect(config=config)`` for the commands: a taken name suggests ``--name``; the
    client is closed (flushed, bounded) on the way out."""
    try:
        client = await connect(config=config)
    except AuthError as exc:
        if exc.code != ErrorCode.NAME_TAKEN:
            raise
        raise AuthError(f"{exc}; choose another with --name", code=exc.code) from None
    async with client:
        yield client


# -- send and listen -----------------------------------------------------------------------------


async def run_send(config: ClientConfig, *, room: str | None, to: str | None, message: str) -> int:
    """Send ``message`` (JSON if it parses, else a string) to ``room`` or to the client ``to``
    and return 0 once the server acknowledged it."""
    if room is not None:
        check_room(room)
    elif to is None or not _NAME_RE.match(to):
        raise ConfigError(f"--to {to!r}: a name is 1 to 64 letters, digits, _ . @ or -")
    body = parse_body(message)
    config = with_default_name(config)
    where = f"{config.host}:{config.port}"
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
        from securemsg.chat_ui import run_interactive

        return run_interactive(config, rooms=rooms)
    if not rooms:
        raise ConfigError(
            "client needs --room when stdin or stdout is not a terminal: stdin lines are "
            "published to the first room"
        )
    first = rooms[0]
    if not _ROOM_RE.match(first):
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
    server has acknowledged them all, at most :data:`FLUSH_TIMEOUT`."""
    async for line in stdin_lines():
        if line:
            await client.publish(room, line)
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
