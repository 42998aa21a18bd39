"""securemsg: TLS-only messaging with self-healing clients."""

from __future__ import annotations

from securemsg import sync
from securemsg.client import Client, connect
from securemsg.client_types import (
    ClientState,
    Closed,
    Disconnected,
    Message,
    Presence,
    Reconnected,
    Reconnecting,
    StateChange,
)
from securemsg.exceptions import (
    AuthError,
    ClosedError,
    ConfigError,
    ConnectError,
    ProtocolError,
    RejectedError,
    SecureMsgError,
    TimeoutError,
    TLSConfigError,
    TLSError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Client",
    "ClientState",
    "Closed",
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "Disconnected",
    "Message",
    "Presence",
    "ProtocolError",
    "Reconnected",
    "Reconnecting",
    "RejectedError",
    "SecureMsgError",
    "StateChange",
    "TLSConfigError",
    "TLSError",
    "TimeoutError",
    "__version__",
    "connect",
    "sync",
]
