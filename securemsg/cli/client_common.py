"""What the client commands share: names, rooms and bodies from the command line, one
line per message on the way out (control characters escaped), and a client opened for a
command. Used by :mod:`securemsg.cli.commands` and :mod:`securemsg.cli.chat_ui`.
"""

from __future__ import annotations

import contextlib
import getpass
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import msgspec

from securemsg.client.client import Client, Message, connect
from securemsg.client.sessionfile import saved_name
from securemsg.config import ClientConfig
from securemsg.core.messages import ErrorCode, is_valid_name, is_valid_room, is_valid_room_filter
from securemsg.errors import AuthError, ConfigError

__all__ = [
    "certificate_identity",
    "check_room",
    "default_name",
    "format_message",
    "message_record",
    "open_client",
    "parse_body",
    "printable",
    "with_default_name",
]

_NOT_NAME_CHARS: Final = re.compile(r"[^A-Za-z0-9_.@-]+")
_SUFFIX_LENGTH: Final = 5  # "-" and four hex digits
_MAX_NAME: Final = 64
# C0 and C1 controls (all but tab), DEL and the Unicode line separators: escaped on output.
_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


# -- names, rooms and bodies ---------------------------------------------------------------------


def certificate_identity(cert: str | Path) -> str | None:
    """The identity the server sees in the client certificate at ``cert``: its common name,
    else its first DNS name (as :func:`securemsg.tls.contexts.peer_identity`). None when the
    file cannot be read or parsed; :func:`securemsg.tls.contexts.client_context` says why."""
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
        return identity if identity is None or is_valid_name(identity) else None
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no password entry
        user = ""
    base = _NOT_NAME_CHARS.sub("_", user)[: _MAX_NAME - _SUFFIX_LENGTH].strip("_") or "user"
    return f"{base}-{secrets.token_hex(2)}"


def with_default_name(config: ClientConfig) -> ClientConfig:
    """``config`` with ``name`` filled in when it is not set: the name kept in the session
    file (so a restarted process resumes), else :func:`default_name`."""
    if config.name is not None:
        return config
    kept = saved_name(config.session_file) if config.session_file is not None else None
    return msgspec.structs.replace(config, name=kept or default_name(config.cert))


def check_room(room: str, *, pattern: bool = False, option: str = "--room") -> str:
    """``room`` if it is a valid room name (a room filter with ``pattern``), else a
    :class:`ConfigError` that says what a room name may hold."""
    if (is_valid_room_filter if pattern else is_valid_room)(room) and len(room) <= 255:
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
    when set, and ``datagram: true`` for a message published over the datagram channel)."""
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
    if message.datagram:
        record["datagram"] = True  # at most once: a gap in seq may be a loss
    return record


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
