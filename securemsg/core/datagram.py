"""The datagram channel's rules, sans-I/O: cookies, the source limit, the association table
and what one datagram may carry.

Theory of operation. A UDP source address proves nothing until it has echoed a cookie, so
the server keeps no state for it before then (RFC 6347, 4.2.1):

1. A datagram from an address without an association must be a DTLS ClientHello
   (:func:`parse_client_hello`); anything else is dropped without an answer.
2. Each source address draws from a token bucket (:class:`SourceLimiter`) whose buckets
   live in a fixed table: memory does not grow with the number of spoofed sources.
3. A ClientHello without a valid cookie gets a HelloVerifyRequest
   (:func:`hello_verify_request`) built from the cookie alone, and only when it is no
   longer than the ClientHello (no amplification). A cookie is an HMAC of the address and
   port under a secret that rotates (:class:`CookieJar`); the previous secret is still
   accepted, so a cookie lives between one and two rotation periods.
4. Only a ClientHello with a valid cookie creates an association
   (:class:`AssociationTable`), capped in number, with a handshake timeout and then an
   idle timeout.

Inside the association every datagram carries one frame (:func:`decode_datagram`): the
four-byte length and the JSON message of ``docs/protocol.md``, the length equal to what
follows it, the whole at most :data:`MAX_DATAGRAM_FRAME` bytes of JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from securemsg.core.frames import encode_frame
from securemsg.core.gatekeeper import DELIVERY_HEADROOM
from securemsg.core.messages import (
    Bye,
    ClientMessage,
    Hello,
    Join,
    Leave,
    Ping,
    Pong,
    Publish,
    client_decoder,
)
from securemsg.errors import ProtocolError

__all__ = [
    "COOKIE_ROTATION_INTERVAL",
    "DATAGRAM_HEADROOM",
    "MAX_DATAGRAM_FRAME",
    "MAX_UDP_PAYLOAD",
    "AssociationTable",
    "ClientHelloRecord",
    "CookieJar",
    "SourceLimiter",
    "decode_datagram",
    "hello_verify_request",
    "parse_client_hello",
    "peer_key",
    "split_records",
]

#: The path MTU every IPv6 link carries (RFC 8200), less the IPv6 and UDP headers: the
#: largest datagram either end sends.
MAX_UDP_PAYLOAD: Final = 1280 - 40 - 8
#: DTLS 1.2 with AES-GCM spends 13 (header) + 8 (explicit nonce) + 16 (tag) bytes a record,
#: so a record carries at most 1,195 bytes of frame.
MAX_RECORD_PLAINTEXT: Final = MAX_UDP_PAYLOAD - 37
#: What the server adds to a relayed datagram ``publish``: the headroom of every delivery
#: (``from``, ``ts``, ``seq``) and ``,"datagram":true``.
DATAGRAM_HEADROOM: Final = DELIVERY_HEADROOM + len(b',"datagram":true')
#: The largest JSON message a client sends in one datagram: relayed, with its length
#: prefix, it still fits one record.
MAX_DATAGRAM_FRAME: Final = 1024
assert MAX_DATAGRAM_FRAME + DATAGRAM_HEADROOM + 4 <= MAX_RECORD_PLAINTEXT

#: Seconds between two cookie secrets.
COOKIE_ROTATION_INTERVAL: Final = 60.0
COOKIE_SIZE: Final = 16

_RECORD_HEADER: Final = struct.Struct(">BHH6sH")  # type, version, epoch, sequence, length
_HANDSHAKE_HEADER_SIZE: Final = 12  # type, length(3), message_seq(2), offset(3), frag len(3)
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_HELLO_VERIFY_REQUEST: Final = 3
_DTLS_VERSIONS: Final = frozenset({0xFEFF, 0xFEFD})
#: RFC 6347, 4.2.1: the HelloVerifyRequest says DTLS 1.0 whatever is negotiated later.
_HVR_VERSION: Final = 0xFEFF
_DATAGRAM_TYPES: Final = (Hello, Join, Leave, Publish, Ping, Pong, Bye)


def peer_key(host: str, port: int) -> bytes:
    """The bytes a cookie binds: the source address and port."""
    return f"{host}|{port}".encode()


# -- cookies ---------------------------------------------------------------------------------


class CookieJar:
    """Stateless cookies: an HMAC of the peer under a secret that rotates every
    ``rotation_interval`` seconds; a cookie of the previous secret is still valid."""

    def __init__(
        self,
        *,
        rotation_interval: float = COOKIE_ROTATION_INTERVAL,
        new_secret: Callable[[], bytes] = lambda: secrets.token_bytes(32),
    ) -> None:
        self.rotation_interval = rotation_interval
        self._new_secret = new_secret
        self._epoch: int | None = None
        self._current = new_secret()
        self._previous = self._current

    def _rotate(self, now: float) -> None:
        epoch = int(now // self.rotation_interval)
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch:
            # Skipping epochs (an idle server) leaves no old secret alive.
            self._previous = self._current if epoch == self._epoch + 1 else self._new_secret()
            self._current = self._new_secret()
            self._epoch = epoch

    def cookie(self, peer: bytes, now: float) -> bytes:
        self._rotate(now)
        return _mac(self._current, peer)

    def valid(self, peer: bytes, cookie: bytes, now: float) -> bool:
        self._rotate(now)
        if len(cookie) != COOKIE_SIZE:
            return False
        return hmac.compare_digest(cookie, _mac(self._current, peer)) or hmac.compare_digest(
            cookie, _mac(self._previous, peer)
        )


def _mac(secret: bytes, peer: bytes) -> bytes:
    return hmac.new(secret, peer, hashlib.sha256).digest()[:COOKIE_SIZE]


# -- the ClientHello and the HelloVerifyRequest ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHelloRecord:
    """What the stateless path needs of a ClientHello."""

    record_seq: bytes  # 6 bytes, echoed by the HelloVerifyRequest
    message_seq: int
    cookie: bytes
    size: int  # of the whole datagram
    #: The client's random: a retransmitted ClientHello repeats it, a restarted client's
    #: new handshake does not.
    random: bytes = b""


def parse_client_hello(datagram: bytes) -> ClientHelloRecord | None:
    """The ClientHello that opens ``datagram``, or None when the datagram is anything else
    (garbage, a truncated or fragmented ClientHello, a record of an association)."""
    if len(datagram) < _RECORD_HEADER.size + _HANDSHAKE_HEADER_SIZE:
        return None
    kind, version, epoch, record_seq, length = _RECORD_HEADER.unpack_from(datagram)
    if kind != _HANDSHAKE or version not in _DTLS_VERSIONS or epoch != 0:
        return None
    body = datagram[_RECORD_HEADER.size : _RECORD_HEADER.size + length]
    if len(body) != length or length < _HANDSHAKE_HEADER_SIZE:
        return None
    if body[0] != _CLIENT_HELLO:
        return None
    message_length = int.from_bytes(body[1:4], "big")
    message_seq = int.from_bytes(body[4:6], "big")
    offset = int.from_bytes(body[6:9], "big")
    fragment = int.from_bytes(body[9:12], "big")
    hello = body[_HANDSHAKE_HEADER_SIZE:]
    if offset != 0 or fragment != message_length or len(hello) != message_length:
        return None  # a fragmented ClientHello is legal but never ours to buffer statelessly
    # client_version(2) random(32) session_id<0..32> cookie<0..255>
    at = 34
    if len(hello) < at + 1:
        return None
    session_id_length = hello[at]
    at += 1 + session_id_length
    if session_id_length > 32 or len(hello) < at + 1:
        return None
    cookie_length = hello[at]
    cookie = hello[at + 1 : at + 1 + cookie_length]
    if len(cookie) != cookie_length:
        return None
    return ClientHelloRecord(
        record_seq=record_seq,
        message_seq=message_seq,
        cookie=cookie,
        size=len(datagram),
        random=hello[2:34],
    )


def hello_verify_request(hello: ClientHelloRecord, cookie: bytes) -> bytes | None:
    """The HelloVerifyRequest answering ``hello`` with ``cookie``; None when it would be
    longer than the ClientHello (the server never amplifies)."""
    body = struct.pack(">HB", _HVR_VERSION, len(cookie)) + cookie
    handshake = (
        bytes([_HELLO_VERIFY_REQUEST])
        + len(body).to_bytes(3, "big")
        + hello.message_seq.to_bytes(2, "big")
        + (0).to_bytes(3, "big")
        + len(body).to_bytes(3, "big")
        + body
    )
    record = (
        _RECORD_HEADER.pack(_HANDSHAKE, _HVR_VERSION, 0, hello.record_seq, len(handshake))
        + handshake
    )
    return record if len(record) <= hello.size else None


def split_records(data: bytes) -> Iterator[bytes]:
    """The whole DTLS records in ``data`` (what a memory BIO gives: records back to back);
    a truncated tail is dropped."""
    at = 0
    size = _RECORD_HEADER.size
    while at + size <= len(data):
        length = int.from_bytes(data[at + size - 2 : at + size], "big")
        end = at + size + length
        if end > len(data):
            return
        yield data[at:end]
        at = end


def pack_datagrams(records: Iterator[bytes], *, limit: int = MAX_UDP_PAYLOAD) -> list[bytes]:
    """Records packed into as few datagrams of at most ``limit`` bytes as they fit, in order
    (a record longer than ``limit`` travels alone)."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > limit:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


# -- the source limit ------------------------------------------------------------------------


class SourceLimiter:
    """A token bucket per source address (``rate`` a second, ``burst`` at most) in a table
    of ``slots`` buckets that never grows: addresses are hashed under a random key, so two
    may share a bucket (and be limited together) but a flood of spoofed sources costs no
    memory and cannot aim at one victim's bucket."""

    def __init__(self, *, rate: float, burst: float, slots: int = 4096) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._key = secrets.token_bytes(16)
        self._tokens = [self.burst] * slots
        self._stamps = [0.0] * slots
        self._started: list[bool] = [False] * slots

    def _slot(self, host: str) -> int:
        digest = hashlib.blake2b(host.encode(), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest, "big") % len(self._tokens)

    def allow(self, host: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        slot = self._slot(host)
        tokens = self._tokens[slot]
        if self._started[slot]:
            tokens = min(self.burst, tokens + (now - self._stamps[slot]) * self.rate)
        self._started[slot] = True
        self._stamps[slot] = now
        if tokens < 1.0:
            self._tokens[slot] = tokens
            return False
        self._tokens[slot] = tokens - 1.0
        return True


# -- associations ----------------------------------------------------------------------------

A = TypeVar("A")


class AssociationTable(Generic[A]):
    """The associations by peer: at most ``max_associations``; one that has not finished
    its handshake within ``handshake_timeout``, or received nothing valid for
    ``idle_timeout``, is returned by :meth:`expired`. Both orders are kept as insertion
    orders, so expiry looks only at what is due."""

    def __init__(
        self, *, max_associations: int, handshake_timeout: float, idle_timeout: float
    ) -> None:
        self.max_associations = max_associations
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._handshaking: OrderedDict[bytes, tuple[A, float]] = OrderedDict()
        self._open: OrderedDict[bytes, tuple[A, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._handshaking) + len(self._open)

    def get(self, peer: bytes) -> A | None:
        entry = self._open.get(peer) or self._handshaking.get(peer)
        return entry[0] if entry is not None else None

    def handshaking(self) -> list[A]:
        return [entry[0] for entry in self._handshaking.values()]

    def values(self) -> list[A]:
        return [entry[0] for entry in (*self._handshaking.values(), *self._open.values())]

    def add(self, peer: bytes, association: A, now: float) -> bool:
        """Start an association in its handshake; False at the cap (nothing added)."""
        if peer in self._handshaking or peer in self._open:
            return False
        if len(self) >= self.max_associations:
            return False
        self._handshaking[peer] = (association, now)
        return True

    def established(self, peer: bytes, now: float) -> None:
        entry = self._handshaking.pop(peer, None)
        if entry is not None:
            self._open[peer] = (entry[0], now)

    def touch(self, peer: bytes, now: float) -> None:
        """Something valid arrived from ``peer``: its idle time starts again."""
        entry = self._open.get(peer)
        if entry is not None:
            self._open[peer] = (entry[0], now)
            self._open.move_to_end(peer)

    def remove(self, peer: bytes) -> A | None:
        entry = self._open.pop(peer, None) or self._handshaking.pop(peer, None)
        return entry[0] if entry is not None else None

    def expired(self, now: float) -> list[tuple[bytes, A, str]]:
        """Remove and return ``(peer, association, reason)`` for each one past its timeout;
        ``reason`` is ``handshake_timeout`` or ``idle_timeout``."""
        gone: list[tuple[bytes, A, str]] = []
        for table, timeout, reason in (
            (self._handshaking, self.handshake_timeout, "handshake_timeout"),
            (self._open, self.idle_timeout, "idle_timeout"),
        ):
            while table:
                peer, (association, since) = next(iter(table.items()))
                if now - since < timeout:
                    break
                del table[peer]
                gone.append((peer, association, reason))
        return gone


# -- frames ----------------------------------------------------------------------------------


def decode_datagram(data: bytes, *, max_depth: int) -> ClientMessage:
    """The one message of one datagram's plaintext, or :class:`ProtocolError`: the length
    prefix must equal what follows (a datagram is never split nor joined), the message at
    most :data:`MAX_DATAGRAM_FRAME` bytes, of a type the datagram channel carries."""
    if len(data) < 4:
        raise ProtocolError("bad_frame", "a datagram holds one whole frame")
    length = int.from_bytes(data[:4], "big")
    if length == 0 or length != len(data) - 4:
        raise ProtocolError("bad_frame", "a datagram holds one whole frame")
    if length > MAX_DATAGRAM_FRAME:
        raise ProtocolError(
            "too_large", f"a datagram frame is at most {MAX_DATAGRAM_FRAME} bytes, got {length}"
        )
    decode = client_decoder(max_depth=max_depth, max_frame=MAX_DATAGRAM_FRAME + DELIVERY_HEADROOM)
    message = decode(data[4:])
    if not isinstance(message, _DATAGRAM_TYPES):
        kind = message.__struct_config__.tag
        raise ProtocolError(
            "bad_message",
            f"{kind!r} is not carried by the datagram channel (use the TLS channel)",
            ref=getattr(message, "id", None)
            if isinstance(getattr(message, "id", None), str)
            else None,
        )
    return message


def datagram_frame(payload: bytes) -> bytes:
    """One datagram's plaintext: the frame of ``payload``."""
    return encode_frame(payload)
