"""securemsg: TLS-only messaging with self-healing clients."""

from __future__ import annotations

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
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "ProtocolError",
    "RejectedError",
    "SecureMsgError",
    "TLSConfigError",
    "TLSError",
    "TimeoutError",
    "__version__",
]
