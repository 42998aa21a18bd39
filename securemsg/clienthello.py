"""A look at the first bytes of a connection before TLS starts, sans-I/O.

The server peeks (``MSG_PEEK``) at what a client sent first and passes those bytes to
:func:`inspect_client_hello`. Python's ``ssl`` reports ``selected_alpn_protocol() is None``
both for a client that offered no ALPN and for one that offered only other protocols, and
it cannot say that a client spoke plaintext or HTTP; the ClientHello can.

Theory of operation: a TLS connection opens with handshake records (content type 22) that
carry one ClientHello (handshake type 1), possibly split over several records. We collect
the handshake bytes until the ClientHello is complete, then walk its fixed fields and its
extensions for ALPN (16) and SNI (0). Anything that does not parse is ``plaintext``; bytes
that open with an HTTP method are ``http``. Nothing here raises on any input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ALPN_PROTOCOL",
    "MAX_CLIENT_HELLO_PEEK",
    "ClientHelloInfo",
    "alpn_acceptable",
    "inspect_client_hello",
]

#: The one application protocol securemsg speaks (re-exported by :mod:`securemsg.tls`).
ALPN_PROTOCOL: Final = "securemsg/1"

#: One full TLS record: once this many bytes arrived, :func:`inspect_client_hello` decides.
MAX_CLIENT_HELLO_PEEK: Final = 16384 + 5

_RECORD_HANDSHAKE: Final = 0x16
_HANDSHAKE_CLIENT_HELLO: Final = 1
_MAX_RECORD: Final = 16384
_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_HTTP_METHODS: Final = tuple(
    method + b" "
    for method in (b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"DELETE", b"PATCH")
)


@dataclass(frozen=True, slots=True)
class ClientHelloInfo:
    """What the first bytes of a connection say about the client.

    ``alpn`` is None when the ClientHello has no ALPN extension (or is not TLS);
    ``server_name`` is the SNI host name, if any.
    """

    kind: Literal["tls", "plaintext", "http"]
    alpn: tuple[str, ...] | None = None
    server_name: str | None = None


_PLAINTEXT: Final = ClientHelloInfo("plaintext")
_HTTP: Final = ClientHelloInfo("http")
#: A ClientHello too large to see whole: let the TLS stack judge it.
_TLS_UNSEEN: Final = ClientHelloInfo("tls")


class _MalformedError(Exception):
    """Raised inside this module only; never escapes :func:`inspect_client_hello`."""


def inspect_client_hello(data: bytes) -> ClientHelloInfo | None:
    """Classify the first bytes a client sent; None means "wait for more bytes".

    Once :data:`MAX_CLIENT_HELLO_PEEK` bytes or more arrived, the answer is never None.
    """
    if not data:
        return None
    if data[0] != _RECORD_HANDSHAKE:
        return _classify_non_tls(data)
    try:
        body = _client_hello_body(data)
        if body is None:
            return _TLS_UNSEEN if len(data) >= MAX_CLIENT_HELLO_PEEK else None
        return _parse_client_hello(body)
    except (_MalformedError, IndexError, ValueError):
        return _PLAINTEXT


def alpn_acceptable(info: ClientHelloInfo) -> bool:
    """True when the client offered no ALPN at all, or offered ``securemsg/1``."""
    return info.alpn is None or ALPN_PROTOCOL in info.alpn


def _classify_non_tls(data: bytes) -> ClientHelloInfo | None:
    for method in _HTTP_METHODS:
        if data.startswith(method):
            return _HTTP
        if len(data) < len(method) and method.startswith(data):
            return None  # could still become an HTTP request line
    return _PLAINTEXT


def _client_hello_body(data: bytes) -> bytes | None:
    """Join the handshake records; return the ClientHello body, or None if incomplete."""
    handshake = bytearray()
    offset = 0
    while True:
        if len(data) - offset < 5:
            return None
        content_type, major, length = data[offset], data[offset + 1], _u16(data, offset + 3)
        if content_type != _RECORD_HANDSHAKE or major != 3 or not 0 < length <= _MAX_RECORD:
            raise _MalformedError
        start = offset + 5
        if len(data) - start < length:
            return None
        handshake += data[start : start + length]
        offset = start + length
        if len(handshake) >= 4:
            if handshake[0] != _HANDSHAKE_CLIENT_HELLO:
                raise _MalformedError
            body_length = int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= 4 + body_length:
                return bytes(handshake[4 : 4 + body_length])


def _parse_client_hello(body: bytes) -> ClientHelloInfo:
    reader = _Reader(body)
    if reader.take(2)[0] != 3:  # legacy_version
        raise _MalformedError
    reader.take(32)  # random
    if len(reader.vector(1)) > 32:  # legacy_session_id
        raise _MalformedError
    suites = reader.vector(2)
    if not suites or len(suites) % 2:
        raise _MalformedError
    if not reader.vector(1):  # legacy_compression_methods
        raise _MalformedError
    if reader.at_end():  # a hello without extensions is legal
        return ClientHelloInfo("tls")
    extensions = _Reader(reader.vector(2))
    reader.expect_end()
    alpn: tuple[str, ...] | None = None
    server_name: str | None = None
    seen: set[int] = set()
    while not extensions.at_end():
        ext_type = _u16(extensions.take(2), 0)
        ext_data = extensions.vector(2)
        if ext_type in seen:
            raise _MalformedError
        seen.add(ext_type)
        if ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext_data)
        elif ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(ext_data)
    return ClientHelloInfo("tls", alpn, server_name)


def _parse_alpn(ext_data: bytes) -> tuple[str, ...]:
    outer = _Reader(ext_data)
    names = _Reader(outer.vector(2))
    outer.expect_end()
    protocols: list[str] = []
    while not names.at_end():
        name = names.vector(1)
        if not name:
            raise _MalformedError
        protocols.append(name.decode("utf-8", "backslashreplace"))
    if not protocols:
        raise _MalformedError
    return tuple(protocols)


def _parse_server_name(ext_data: bytes) -> str | None:
    if not ext_data:
        return None
    outer = _Reader(ext_data)
    entries = _Reader(outer.vector(2))
    outer.expect_end()
    while not entries.at_end():
        name_type = entries.take(1)[0]
        name = entries.vector(2)
        if name_type == 0 and name:  # host_name
            return name.decode("ascii", "backslashreplace")
    return None


def _u16(data: bytes | bytearray, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


class _Reader:
    """A cursor over bytes whose every read is bounds-checked."""

    __slots__ = ("_data", "_offset")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise _MalformedError
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def vector(self, length_size: int) -> bytes:
        """A TLS variable-length vector with a ``length_size``-byte length prefix."""
        return self.take(int.from_bytes(self.take(length_size), "big"))

    def at_end(self) -> bool:
        return self._offset == len(self._data)

    def expect_end(self) -> None:
        if not self.at_end():
            raise _MalformedError
