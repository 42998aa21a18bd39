"""What the client hands to applications: received messages, presence and state events.

All of them are immutable. :class:`Message` is what ``receive()`` and ``async for`` yield;
:class:`Presence` comes only from ``client.presence()``; the state events come only from
``client.state_changes()``, so the message stream never mixes in anything but messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

__all__ = [
    "ClientState",
    "Closed",
    "Disconnected",
    "Message",
    "Presence",
    "Reconnected",
    "Reconnecting",
    "StateChange",
]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag="message", tag_field="type"):
    """A message delivered to this client: a room message (``room`` set) or a direct one
    (``to`` set). ``body`` is the decoded JSON value; ``time`` is the server's timestamp.

    The client decodes the wire's ``message`` straight into this (``from`` is ``sender``,
    ``ts`` is ``time``), so each delivery is one object, made once."""

    room: str | None = None
    sender: str = msgspec.field(name="from")
    to: str | None = None
    body: Any
    seq: int
    time: float = msgspec.field(name="ts")
    reply_to: str | None = None
    re: str | None = None
    id: str | None = None


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    """``name`` joined or left ``room`` (a room filter, as it was joined)."""

    room: str
    name: str
    event: Literal["join", "leave"]


class ClientState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection was lost; ``reason`` says why (``heartbeat_timeout``, ``eof``, ...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """Attempt number ``attempt`` starts after ``delay`` seconds."""

    attempt: int
    delay: float


@dataclass(frozen=True, slots=True)
class Reconnected:
    """Connected again. ``resumed``: the server kept the session and replays what was missed.
    Otherwise the rooms were joined again and messages may have been lost meanwhile:
    ``gap`` is how many, 0 when none, None when unknown."""

    resumed: bool
    gap: int | None


@dataclass(frozen=True, slots=True)
class Closed:
    """The client is closed; ``error`` is set when it gave up rather than being closed."""

    error: str | None = None


StateChange = Disconnected | Reconnecting | Reconnected | Closed
