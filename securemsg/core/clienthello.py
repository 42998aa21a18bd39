"""A look at the first bytes of a connection before TLS starts, sans-I/O.

The server reads what a client sent first and passes those bytes to
:func:`inspect_client_hello` before it gives them to TLS (``server/incoming.py``). Python's
``ssl`` reports ``selected_alpn_protocol() is None`` both for a client that offered no ALPN
and for one that offered only other protocols, and it cannot say that a client spoke
plaintext or HTTP; the ClientHello can.

Theory of operation: a TLS connection opens with handshake records (content type 22) that
carry one ClientHello (handshake type 1), possibly split over several records. We collect
the handshake bytes until the ClientHello is complete, then walk its fixed fields and its
extension for ALPN (16). Anything that does not parse is ``plaintext``; bytes
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
    "offers_securemsg",
]

#: The one application protocol securemsg speaks (re-exported by :mod:`securemsg.tls.contexts`).
ALPN_PROTOCOL: Final = "securemsg/1"

#: One full TLS record: once this many bytes arrived, :func:`inspect_client_hello` decides.
MAX_CLIENT_HELLO_PEEK: Final = 16384 + 5

_RECORD_HANDSHAKE: Final = 0x16
#: ALPN's entry for securemsg/1 in a ClientHello: a length byte, then the name.
_ALPN_ENTRY: Final = bytes([len(ALPN_PROTOCOL)]) + ALPN_PROTOCOL.encode()
_HANDSHAKE_CLIENT_HELLO: Final = 1
_MAX_RECORD: Final = 16384
_EXT_ALPN: Final = 16
_HTTP_METHODS: Final = tuple(
    method + b" "
    for method in (b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"DELETE", b"PATCH")
)


@dataclass(frozen=True, slots=True)
class ClientHelloInfo:
    """What the first bytes of a connection say about the client.

    ``alpn`` is None when the ClientHello has no ALPN extension (or is not TLS).
    """

    kind: Literal["tls", "plaintext", "http"]
    alpn: tuple[str, ...] | None = None


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


def offers_securemsg(data: bytes) -> bool:
    """A quick yes for the common case, before :func:`inspect_client_hello`: ``data`` opens a
    TLS handshake record and holds ALPN's entry for ``securemsg/1``.

    Its yes skips the walk through the ClientHello (~6 µs per connection): OpenSSL parses the
    hello anyway and fails the handshake if it is malformed. The entry's bytes elsewhere in
    a hello (a server name, say) cannot get a client more than a hello without ALPN gets:
    a handshake, which OpenSSL judges.
    """
    return bool(data) and data[0] == _RECORD_HANDSHAKE and _ALPN_ENTRY in data


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
    # Offsets checked against the end of the enclosing vector, not a cursor object with a
    # method call per field: this runs for every connection, and the cursor took ~23 µs
    # per ClientHello of our client where this takes ~6 µs.
    end = len(body)
    if body[0] != 3:  # legacy_version
        raise _MalformedError
    start, at = _vector(body, 34, 1, end)  # legacy_session_id, after the 32-byte random
    if at - start > 32:
        raise _MalformedError
    start, at = _vector(body, at, 2, end)  # cipher_suites
    if start == at or (at - start) % 2:
        raise _MalformedError
    start, at = _vector(body, at, 1, end)  # legacy_compression_methods
    if start == at:
        raise _MalformedError
    if at == end:  # a hello without extensions is legal
        return ClientHelloInfo("tls")
    at, stop = _vector(body, at, 2, end)
    if stop != end:
        raise _MalformedError
    alpn: tuple[str, ...] | None = None
    seen: set[int] = set()
    while at < stop:  # extensions: type (2 bytes), then a vector with a 2-byte length
        start = at + 4
        if start > stop:
            raise _MalformedError
        ext_type = (body[at] << 8) | body[at + 1]
        at = start + ((body[at + 2] << 8) | body[at + 3])
        if at > stop or ext_type in seen:
            raise _MalformedError
        seen.add(ext_type)
        if ext_type == _EXT_ALPN:
            alpn = _parse_alpn(body, start, at)
    return ClientHelloInfo("tls", alpn)


def _parse_alpn(body: bytes, at: int, end: int) -> tuple[str, ...]:
    at, stop = _vector(body, at, 2, end)
    if stop != end or at == stop:
        raise _MalformedError
    protocols: list[str] = []
    while at < stop:
        start, at = _vector(body, at, 1, stop)
        if start == at:
            raise _MalformedError
        protocols.append(body[start:at].decode("utf-8", "backslashreplace"))
    return tuple(protocols)


def _vector(data: bytes, at: int, length_size: int, end: int) -> tuple[int, int]:
    """Where the contents of the TLS vector at ``at`` start and stop; it must end by ``end``."""
    start = at + length_size
    stop = start + int.from_bytes(data[at:start], "big")
    if start > end or stop > end:
        raise _MalformedError
    return start, stop


def _u16(data: bytes | bytearray, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]
