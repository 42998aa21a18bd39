"""Every error securemsg raises, rooted at :class:`SecureMsgError`.

::

    SecureMsgError
    ├── ConfigError            a bad option, file or value (names the key or file)
    │   └── TLSConfigError     certificate, key or CA files that cannot be used
    ├── ProtocolError          bytes or frames that break the wire protocol (has .code)
    ├── ConnectError           could not reach or enter the server
    │   ├── TLSError           the TLS handshake failed (has .check: which verification failed)
    │   └── AuthError          the server refused who we are (has .code: unauthorized, name_taken)
    ├── RejectedError          the server refused requests (has .code, .ids: which ones)
    ├── StoreError             a session store or client session file cannot be used (names it)
    ├── TimeoutError           a bounded wait ran out (also a builtin TimeoutError)
    └── ClosedError            the client or connection is closed

``ProtocolError`` is raised only by the sans-I/O core for bytes a peer sent; the drivers turn
it into an ``error`` frame and a close, so applications see it only from the client.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuthError",
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "ProtocolError",
    "RejectedError",
    "SecureMsgError",
    "StoreError",
    "TLSConfigError",
    "TLSError",
    "TimeoutError",
]


class SecureMsgError(Exception):
    """Base class of every securemsg error."""


class ConfigError(SecureMsgError):
    """A configuration option, file or value is wrong; the message names it."""


class TLSConfigError(ConfigError):
    """A certificate, key or CA file is missing, unreadable or does not fit."""


class ProtocolError(SecureMsgError):
    """The peer broke the wire protocol; ``code`` is the machine-readable error code."""

    def __init__(self, code: str, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r})"


class ConnectError(SecureMsgError):
    """The client could not connect to the server or enter a session."""


class TLSError(ConnectError):
    """The TLS handshake failed; ``check`` names what failed.

    ``check`` is one of ``unknown_authority``, ``hostname_mismatch``, ``expired``,
    ``client_certificate``, ``protocol`` or ``other``.
    """

    def __init__(self, message: str, *, check: str = "other") -> None:
        super().__init__(message)
        self.check = check


class AuthError(ConnectError):
    """The server refused the client's identity or token; ``code`` says why."""

    def __init__(self, message: str, *, code: str = "unauthorized") -> None:
        super().__init__(message)
        self.code = code


class RejectedError(SecureMsgError):
    """The server answered requests with ``error`` frames: ``code`` is the (most frequent)
    reason, ``message`` the server's words, ``ids`` the ids of the refused requests, in the
    order they were refused (empty for a ``hello`` refused before any request)."""

    def __init__(self, code: str, message: str, *, ids: tuple[str, ...] = ()) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.ids = ids


class StoreError(SecureMsgError):
    """The server's session store, or a client's session file, cannot be opened, read or
    written (or the session file is in use by another process); the message names the file
    and says why in one sentence. The file is left as it was."""


class TimeoutError(SecureMsgError, builtins.TimeoutError):
    """A bounded wait ran out before it completed."""


class ClosedError(SecureMsgError):
    """The client is closed, or closed while the call was waiting."""
