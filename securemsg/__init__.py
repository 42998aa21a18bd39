"""securemsg: TLS-only messaging with self-healing clients.

The public API: :func:`connect` and :class:`Client` (asyncio), :mod:`securemsg.sync` (blocking),
:class:`Server`, the value types and the exception tree. Names are loaded on first use, so
``import securemsg`` costs little and never loads the server (nor the server the client).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if os.environ.get("SECUREMSG_COMPILED"):  # the optional compiled core: bench/compile.py
    from securemsg._compiled import install as _install_compiled

    _install_compiled()

from securemsg.errors import (
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

if TYPE_CHECKING:
    from securemsg import datagram, sync
    from securemsg.client.client import Client, connect
    from securemsg.client.types import (
        ClientState,
        Closed,
        Disconnected,
        Message,
        MessageSkipped,
        Presence,
        Reconnected,
        Reconnecting,
        StateChange,
    )
    from securemsg.server.server import Server

__version__ = "0.1.0"

_LAZY = {
    "Client": "securemsg.client.client",
    "connect": "securemsg.client.client",
    "ClientState": "securemsg.client.types",
    "Closed": "securemsg.client.types",
    "Disconnected": "securemsg.client.types",
    "Message": "securemsg.client.types",
    "MessageSkipped": "securemsg.client.types",
    "Presence": "securemsg.client.types",
    "Reconnected": "securemsg.client.types",
    "Reconnecting": "securemsg.client.types",
    "StateChange": "securemsg.client.types",
    "Server": "securemsg.server.server",
}


def __getattr__(name: str) -> Any:
    if name in ("sync", "datagram"):
        return importlib.import_module(f"securemsg.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'securemsg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
    "MessageSkipped",
    "Presence",
    "ProtocolError",
    "Reconnected",
    "Reconnecting",
    "RejectedError",
    "SecureMsgError",
    "Server",
    "StateChange",
    "TLSConfigError",
    "TLSError",
    "TimeoutError",
    "__version__",
    "connect",
    "datagram",
    "sync",
]
