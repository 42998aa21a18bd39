"""What the client hands to applications: received messages, presence and state events.

All of them are immutable. :class:`Message` is what ``receive()`` and ``async for`` yield;
:class:`Presence` comes only from ``client.presence()``; the state events come only from
``client.state_changes()``, so the message stream never mixes in anything but messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from securemsg.core.messages import Message, Presence

__all__ = [
    "ClientState",
    "Closed",
    "Disconnected",
    "Message",
    "MessageSkipped",
    "Presence",
    "Reconnected",
    "Reconnecting",
    "StateChange",
]


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


@dataclass(frozen=True, slots=True)
class MessageSkipped:
    """Message ``seq`` arrived but its body could not be decoded here (``reason``): it was
    acknowledged and skipped, so it cannot block the messages after it. A server that
    checks bodies (securemsg does) never relays one; this is defence in depth."""

    seq: int
    reason: str


StateChange = Disconnected | Reconnecting | Reconnected | MessageSkipped | Closed
