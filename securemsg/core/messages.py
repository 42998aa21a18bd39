"""The wire messages: one msgspec Struct per type, tagged on ``"type"``, sans-I/O.

Client-to-server and server-to-client messages form two separate unions (the two ``ack``
shapes differ). Bodies are kept as :class:`msgspec.Raw` so the server relays them without
decoding; the client decodes them with :func:`decode_body`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import msgspec

from securemsg.core.frames import DEFAULT_MAX_FRAME, encode_frame
from securemsg.core.gatekeeper import (
    DEFAULT_MAX_DEPTH,
    DELIVERY_HEADROOM,
    body_decoder,
    body_problem,
    top_level_value,
)
from securemsg.errors import ProtocolError

__all__ = [
    "ACK_BATCH",
    "ACK_DELAY",
    "BATCH_VERSION",
    "BYE_SERVER_SHUTDOWN",
    "FATAL_CODES",
    "MAX_BATCH_ITEMS",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Ack",
    "Batch",
    "Bye",
    "CheckedPublish",
    "ClientBound",
    "ClientMessage",
    "Delivery",
    "DeliveryBatch",
    "Direct",
    "Error",
    "ErrorCode",
    "Heartbeat",
    "Hello",
    "Join",
    "Leave",
    "MemberNames",
    "Members",
    "Message",
    "MessageBatch",
    "Ping",
    "Pong",
    "Presence",
    "Publish",
    "ServerAck",
    "ServerMessage",
    "Welcome",
    "Who",
    "batch_frame",
    "batch_items",
    "batch_of",
    "client_decoder",
    "decode_at_client",
    "decode_body",
    "decode_client",
    "decode_server",
    "delivery_seq",
    "encode",
    "encode_body",
    "encode_frame_of",
    "is_valid_name",
    "is_valid_room",
    "is_valid_room_filter",
    "relayed_checker",
    "shorten",
]

PROTOCOL_VERSION: Final = 3
#: The versions a server accepts in ``hello``: 2 is 3 without ``batch`` frames.
SUPPORTED_VERSIONS: Final = frozenset({2, 3})
#: The first version in which both ends may send ``batch`` frames.
BATCH_VERSION: Final = 3
#: The most items a ``batch`` may hold (either direction).
MAX_BATCH_ITEMS: Final = 1024
#: The longest the server holds an ``ack`` back, hoping to send it with another frame.
ACK_DELAY: Final = 0.005
#: Held acks go out at once when this many are pending.
ACK_BATCH: Final = 128

# ``\Z``, not ``$``: msgspec searches with the pattern as given, and ``$`` also matches
# before a trailing newline, which would let "room\n" through.
#: Room names: dot-separated tokens of letters, digits, ``_`` and ``-``.
ROOM_PATTERN: Final = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\Z"
#: Room patterns for join/leave: a token may be ``*`` (one token), the last may be ``>`` (rest).
ROOM_FILTER_PATTERN: Final = r"^([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?\Z|^>\Z"
#: Client names: 1 to 64 of letters, digits, ``_``, ``-``, ``.`` and ``@``.
NAME_PATTERN: Final = r"^[A-Za-z0-9_.@-]{1,64}\Z"

# Rooms in publish and names in direct are checked by __post_init__ against a cache of values
# seen valid (is_valid_room, is_valid_name) instead of msgspec's regex on every decode.
CheckedRoom = Annotated[str, msgspec.Meta(max_length=255)]
RoomFilter = Annotated[str, msgspec.Meta(pattern=ROOM_FILTER_PATTERN, max_length=255)]
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
CheckedName = Annotated[str, msgspec.Meta(max_length=64)]
MsgId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Token = Annotated[str, msgspec.Meta(max_length=1024)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    TOO_LARGE = "too_large"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    UNAUTHORIZED = "unauthorized"
    NAME_TAKEN = "name_taken"
    NO_SUCH_USER = "no_such_user"
    NOT_MEMBER = "not_member"
    RATE_LIMITED = "rate_limited"
    SLOW_CONSUMER = "slow_consumer"
    SERVER_BUSY = "server_busy"
    SESSION_TAKEN_OVER = "session_taken_over"
    TOO_MANY_ROOMS = "too_many_rooms"


#: The ``reason`` of the ``bye`` a server sends every client when it shuts down.
BYE_SERVER_SHUTDOWN: Final = "server_shutdown"
#: The ``reason`` of the ``bye`` a cluster node sends its clients when it lost the cluster
#: (NATS): the client resumes its session on another node at once.
BYE_NODE_UNAVAILABLE: Final = "node_unavailable"

#: Codes after which the sender closes the connection. The others answer one message and
#: the connection carries on.
FATAL_CODES: Final = frozenset(
    {
        ErrorCode.BAD_FRAME,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.HANDSHAKE_TIMEOUT,
        ErrorCode.HEARTBEAT_TIMEOUT,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.NAME_TAKEN,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.SERVER_BUSY,
        ErrorCode.SESSION_TAKEN_OVER,
    }
)


_MAX_REMEMBERED: Final = 4096


class _Validator:
    """Does a value match ``pattern``? Rooms and names repeat, so the values seen valid are
    remembered and the hot path (publish, direct) pays a set lookup instead of a regex per
    message. Bounded: the memory is cleared when full."""

    __slots__ = ("_match", "seen_valid")

    def __init__(self, pattern: str) -> None:
        self._match = re.compile(pattern).match
        #: The values seen valid (cleared in place when full, never replaced): a caller on
        #: the hot path may look a value up here before it calls the validator.
        self.seen_valid: set[str] = set()

    def __call__(self, value: str) -> bool:
        valid = self.seen_valid
        if value in valid:
            return True
        if self._match(value) is None:
            return False
        if len(valid) >= _MAX_REMEMBERED:
            valid.clear()
        valid.add(value)
        return True


#: Is this a concrete room name (no wildcards)?
is_valid_room: Final = _Validator(ROOM_PATTERN)
#: Is this a valid client name?
is_valid_name: Final = _Validator(NAME_PATTERN)
#: Is this a valid room filter (join, leave, who: ``*`` and a final ``>`` allowed)?
is_valid_room_filter: Final = _Validator(ROOM_FILTER_PATTERN)
_rooms_seen_valid: Final = is_valid_room.seen_valid
_names_seen_valid: Final = is_valid_name.seen_valid


#: The most characters of a client's string that an error text or a log line repeats: a
#: client must not be able to inflate the server's log, or the error echoed to it.
SHOWN_CHARS: Final = 64


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut (for errors and logs)."""
    return text if len(text) <= limit else text[:limit] + "\u2026"


def _check_room(room: str) -> None:
    if not is_valid_room(room):
        raise ValueError(f"bad 'room': {_RULES['room']}")


def _check_name(name: str, field: str) -> None:
    if not is_valid_name(name):
        raise ValueError(f"bad {field!r}: {_RULES['name']}")


class _Base(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True, frozen=True):
    pass


# -- both directions -------------------------------------------------------------------------


class Ping(_Base, tag="ping", frozen=True):
    id: Seq


class Pong(_Base, tag="pong", frozen=True):
    id: Seq


class Bye(_Base, tag="bye", frozen=True):
    reason: str | None = None


# -- client to server ------------------------------------------------------------------------


class Hello(_Base, tag="hello", frozen=True):
    version: int
    #: Optional under mutual TLS, where the certificate names the client.
    name: Name | None = None
    token: Token | None = None
    session: Token | None = None
    last_seq: Seq | None = None


class Join(_Base, tag="join", frozen=True):
    room: RoomFilter
    id: MsgId | None = None


class Leave(_Base, tag="leave", frozen=True):
    room: RoomFilter
    id: MsgId | None = None


class Publish(_Base, tag="publish", frozen=True):
    room: CheckedRoom
    body: msgspec.Raw
    id: MsgId | None = None
    reply_to: Token | None = None

    def __post_init__(self) -> None:
        # The validator's own first step, inlined: this runs for every publish decoded, and
        # the two calls it saves were ~5 % of the server's route.
        if self.room not in _rooms_seen_valid:
            _check_room(self.room)


class CheckedPublish(_Base, tag="publish", frozen=True):
    """A ``publish`` whose room its maker checked already: the same wire object as
    :class:`Publish`, made without checking the room again (a third of the cost of making
    one; the client's publish path makes one per message). For encoding only."""

    room: str
    body: msgspec.Raw
    id: str | None = None
    reply_to: str | None = None


class Direct(_Base, tag="direct", frozen=True):
    to: CheckedName
    body: msgspec.Raw
    id: MsgId | None = None
    re: Token | None = None

    def __post_init__(self) -> None:
        if self.to not in _names_seen_valid:  # as Publish.__post_init__
            _check_name(self.to, "to")


class Who(_Base, tag="who", frozen=True):
    room: RoomFilter
    id: MsgId | None = None


class Ack(_Base, tag="ack", frozen=True):
    """Client to server: every message up to and including ``seq`` was received."""

    seq: Seq


class Batch(_Base, tag="batch", frozen=True):
    """Client to server (protocol 3): ``publish`` and ``direct`` messages in one frame, each
    carried out exactly as if it had come in a frame of its own, in order."""

    items: Annotated[list[Publish | Direct], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


ClientMessage = Hello | Join | Leave | Publish | Direct | Who | Ack | Ping | Pong | Bye | Batch


# -- server to client ------------------------------------------------------------------------


class Heartbeat(msgspec.Struct, kw_only=True, frozen=True):
    interval: float
    timeout: float


class Welcome(_Base, tag="welcome", frozen=True):
    version: int
    session: str
    name: str
    resumed: bool
    heartbeat: Heartbeat
    max_frame: int
    #: In a cluster, the client-facing ``host:port`` of every live node (this one included),
    #: so a client given one address learns the others. Absent from a single server.
    nodes: list[str] | None = None


class Delivery(_Base, tag="message", kw_only=True, frozen=True):
    """A delivered message as the server encodes it: the body relayed as it came (raw).
    ``seq`` is last so the server can splice it into a shared prefix."""

    room: str | None = None
    sender: str = msgspec.field(name="from")
    to: str | None = None
    body: msgspec.Raw
    id: str | None = None
    reply_to: str | None = None
    re: str | None = None
    #: True for a publish that came over the datagram channel (at most once, never resent).
    datagram: bool = False
    ts: float
    seq: int

    @classmethod
    def of_publish(
        cls, msg: Publish, *, sender: str, ts: float, datagram: bool = False
    ) -> Delivery:
        """``msg`` as its room's members get it (``seq`` spliced in per recipient)."""
        return cls(
            room=msg.room,
            sender=sender,
            body=msg.body,
            id=msg.id,
            reply_to=msg.reply_to,
            datagram=datagram,
            ts=ts,
            seq=0,
        )

    @classmethod
    def of_direct(cls, msg: Direct, *, sender: str, ts: float) -> Delivery:
        """``msg`` as its recipient gets it."""
        return cls(sender=sender, to=msg.to, body=msg.body, id=msg.id, re=msg.re, ts=ts, seq=0)


class Message(msgspec.Struct, frozen=True, kw_only=True, tag="message", tag_field="type"):
    """A message delivered to this client: a room message (``room`` set) or a direct one
    (``to`` set). ``body`` is the decoded JSON value; ``time`` is the server's timestamp.

    The same wire ``message`` as :class:`Delivery`, decoded by the client with its body in
    the same pass (``from`` is ``sender``, ``ts`` is ``time``): each delivery is one object,
    made once. It is the public :class:`securemsg.Message`."""

    room: str | None = None
    sender: str = msgspec.field(name="from")
    to: str | None = None
    body: Any
    seq: int
    time: float = msgspec.field(name="ts")
    reply_to: str | None = None
    re: str | None = None
    id: str | None = None
    #: True for a message published over the datagram channel: at most once, and over the
    #: datagram channel ``seq`` counts that association's datagrams (a gap is a loss).
    datagram: bool = False


class ServerAck(_Base, tag="ack", frozen=True):
    """Server to client: the messages that carried ``ids`` were carried out (routed, or the
    join/leave holds), in the order the server received them. One frame answers many: the
    server holds acks back for up to :data:`ACK_DELAY` to send them with other frames."""

    ids: list[str]


class Presence(_Base, tag="presence", frozen=True):
    """``name`` joined or left ``room`` (a room filter, as it was joined). Also the public
    :class:`securemsg.Presence` that ``client.presence()`` yields."""

    room: str
    name: str
    event: Literal["join", "leave"]


class MemberNames(list[str]):
    """The names of a ``members`` frame; ``truncated`` is True when the server cut the list
    to fit its ``max_frame`` (the first names in sorted order are kept)."""

    truncated = False


class Members(_Base, tag="members", frozen=True):
    room: str
    names: list[str]
    ref: str | None = None
    #: The server cut ``names`` to fit ``max_frame`` (sent only when true).
    truncated: bool = False

    def __post_init__(self) -> None:
        if self.truncated:
            # The flag travels with the names, so that whoever gets only the list knows.
            names = MemberNames(self.names)
            names.truncated = True
            msgspec.structs.force_setattr(self, "names", names)


class Error(_Base, tag="error", frozen=True):
    code: str
    message: str
    ref: str | None = None


class DeliveryBatch(_Base, tag="batch", frozen=True):
    """Server to client (protocol 3): ``message`` frames in one frame, in order."""

    items: list[Delivery]


class MessageBatch(_Base, tag="batch", frozen=True):
    """:class:`DeliveryBatch` as the client decodes it: the application's messages."""

    items: list[Message]


class RawBatch(_Base, tag="batch", frozen=True):
    """A ``batch`` whose items are kept encoded: the client's way in when one item cannot be
    decoded with the rest (it then takes the items one by one)."""

    items: list[msgspec.Raw]


ServerMessage = (
    Welcome | Delivery | ServerAck | Presence | Members | Error | Ping | Pong | Bye | DeliveryBatch
)
#: What the client decodes: the same messages, but ``message`` becomes the application's
#: :class:`Message` directly, its body decoded in the same pass (the server relays bodies as
#: they are; the client needs their value).
ClientBound = (
    Welcome | Message | ServerAck | Presence | Members | Error | Ping | Pong | Bye | MessageBatch
)

_CLIENT_TYPES: Final = frozenset(
    {"hello", "join", "leave", "publish", "direct", "who", "ack", "ping", "pong", "bye", "batch"}
)
_SERVER_TYPES: Final = frozenset(
    {"welcome", "message", "ack", "presence", "members", "error", "ping", "pong", "bye", "batch"}
)

_encoder = msgspec.json.Encoder()
_client_decoder = msgspec.json.Decoder(ClientMessage)
_server_decoder = msgspec.json.Decoder(ServerMessage)
_client_bound_decoder = msgspec.json.Decoder(ClientBound)
_raw_batch_decoder = msgspec.json.Decoder(RawBatch)
_any_decoder = body_decoder

encode = _encoder.encode


def encode_frame_of(message: msgspec.Struct) -> bytes:
    """Encode ``message`` as one whole frame, header included."""
    return encode_frame(_encoder.encode(message))


def encode_body(value: Any) -> msgspec.Raw:
    """Encode an application value (any JSON value) as a message body."""
    try:
        return msgspec.Raw(_encoder.encode(value))
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"message body is not JSON-serialisable: {exc}") from None


def decode_body(body: msgspec.Raw) -> Any:
    return _any_decoder.decode(body)


def decode_client(
    payload: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, max_frame: int = DEFAULT_MAX_FRAME
) -> ClientMessage:
    """Decode one client-to-server payload or raise :class:`ProtocolError`.

    A ``publish`` or ``direct`` is refused (``bad_message``, with its id as ``ref``) unless
    every client can receive it: see :mod:`securemsg.core.gatekeeper`."""
    return client_decoder(max_depth=max_depth, max_frame=max_frame)(payload)


@functools.cache
def client_decoder(*, max_depth: int, max_frame: int) -> Callable[[bytes], ClientMessage]:
    """:func:`decode_client` for one server's limits, as a plain function (the hot path):
    made once per pair of limits and shared by every connection.

    A ``batch`` is checked as a whole here (its size: at most what a ``publish`` may be, so
    every item's delivery fits ``max_frame``); its items' bodies are checked one by one by
    the caller with :func:`relayed_checker`, so that one bad item is refused alone."""
    max_relayed = max_frame - DELIVERY_HEADROOM
    check_body = relayed_checker(max_depth=max_depth)

    def decode(payload: bytes) -> ClientMessage:
        message = _decode(payload, _client_decoder, _CLIENT_TYPES)
        kind = type(message)
        if kind is Publish or kind is Direct:
            if len(payload) > max_relayed:
                raise _no_room(message, len(payload), max_frame)
            check_body(message)
        elif kind is Batch and len(payload) > max_relayed:
            raise ProtocolError(
                "bad_frame",
                f"a 'batch' of {len(payload)} bytes: at most {max_relayed} bytes"
                f" (max_frame {max_frame} less {DELIVERY_HEADROOM}), as a 'publish'",
            )
        return message  # type: ignore[no-any-return]

    return decode


@functools.cache
def relayed_checker(*, max_depth: int) -> Callable[[Publish | Direct], None]:
    """The check of a ``publish`` or ``direct`` body that every client can decode it
    (:mod:`securemsg.core.gatekeeper`): raises ``bad_message`` with the message's id."""
    # A body this short cannot nest past max_depth: msgspec alone judges it, inline.
    max_shallow = 2 * max_depth + 1
    check_body = body_decoder.decode

    def check(message: Publish | Direct) -> None:
        body = message.body
        if len(body) <= max_shallow:
            try:
                check_body(body)
            except msgspec.DecodeError as exc:
                raise _refused(message, f"a client cannot decode the body: {exc}") from None
        else:
            problem = body_problem(body, max_depth=max_depth)
            if problem is not None:
                raise _refused(message, problem)

    return check


def _refused(message: Publish | Direct, problem: str) -> ProtocolError:
    kind = message.__struct_config__.tag
    return ProtocolError("bad_message", f"invalid {kind!r} message: {problem}", ref=message.id)


def _no_room(message: Publish | Direct, size: int, max_frame: int) -> ProtocolError:
    kind = message.__struct_config__.tag
    return ProtocolError(
        "bad_message",
        f"a {kind!r} of {size} bytes leaves no room for the {DELIVERY_HEADROOM} bytes the server"
        f" adds when it delivers it: at most {max_frame - DELIVERY_HEADROOM} bytes"
        f" (max_frame {max_frame} less {DELIVERY_HEADROOM})",
        ref=message.id,
    )


def decode_server(payload: bytes) -> ServerMessage:
    """Decode one server-to-client payload or raise :class:`ProtocolError`."""
    return _decode(payload, _server_decoder, _SERVER_TYPES)  # type: ignore[no-any-return]


def decode_at_client(payload: bytes) -> ClientBound:
    """Decode one server-to-client payload, bodies included, or raise :class:`ProtocolError`."""
    return _decode(payload, _client_bound_decoder, _SERVER_TYPES)  # type: ignore[no-any-return]


def batch_items(payload: bytes) -> list[bytes] | None:
    """The items of a ``batch`` frame, each still encoded, or None when the frame is not a
    list of JSON values under ``items`` (the client takes them one by one when the batch
    as a whole does not decode)."""
    try:
        batch = _raw_batch_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None
    return [bytes(item) for item in batch.items]


def batch_frame(frames: list[bytes]) -> bytes:
    """Whole frames of ``message`` (server) or ``publish``/``direct`` (client) objects as one
    ``batch`` frame, header included; their payloads are joined as they are."""
    return batch_of([f[4:] for f in frames])


def batch_of(payloads: list[bytes]) -> bytes:
    """:func:`batch_frame` of the frames' payloads (no headers)."""
    return encode_frame(b'{"type":"batch","items":[%s]}' % b",".join(payloads))


def _decode(payload: bytes, decoder: msgspec.json.Decoder[Any], types: frozenset[str]) -> Any:
    # msgspec does not check UTF-8 inside Raw bodies; isascii() is a cheap pass for most frames.
    if not payload.isascii():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("bad_frame", f"frame is not valid UTF-8 ({exc.reason})") from None
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise _classify(payload, str(exc), types) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("bad_frame", f"frame is not valid JSON: {shorten(str(exc))}") from None
    except RecursionError:
        raise _too_deep(payload) from None


def _too_deep(payload: bytes) -> ProtocolError:
    # msgspec recurses once per level of nesting; past the recursion limit it gives up. The
    # frame may still be a fine message apart from its depth: say so, with its id.
    ref = top_level_value(payload, "id")
    return ProtocolError(
        "bad_message",
        "message nests too deep to decode",
        ref=ref if isinstance(ref, str) and len(ref) <= 128 else None,
    )


def delivery_seq(payload: bytes) -> int | None:
    """The ``seq`` of a server-to-client ``message`` whose body the client cannot decode
    (the rest of it valid), so that the client can acknowledge it and move on; None when
    the frame is not such a message."""
    try:
        message = _server_decoder.decode(payload)
    except RecursionError:
        if top_level_value(payload, "type") != "message":
            return None
        seq = top_level_value(payload, "seq")
        return seq if isinstance(seq, int) and 0 <= seq <= 2**53 else None
    except msgspec.DecodeError:
        return None
    return message.seq if type(message) is Delivery else None


def _classify(payload: bytes, detail: str, types: frozenset[str]) -> ProtocolError:
    # The slow path, taken only for invalid messages: work out which rule was broken.
    # The typed decoder stops at the first invalid value, so the rest may not even be JSON.
    try:
        obj = _any_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        return ProtocolError("bad_frame", f"frame is not valid JSON: {shorten(str(exc))}")
    except RecursionError:
        return _too_deep(payload)
    if not isinstance(obj, dict):
        return ProtocolError("bad_frame", f"frame is not a JSON object: {shorten(detail)}")
    ref = obj.get("id")
    # An id is echoed as ref only when it could be one (MsgId: at most 128 characters).
    ref = ref if isinstance(ref, str) and len(ref) <= 128 else None
    kind = obj.get("type")
    if not isinstance(kind, str):
        return ProtocolError("bad_message", "message has no string field 'type'", ref=ref)
    if kind not in types:
        return ProtocolError("unknown_type", f"unknown message type {shorten(kind)!r}", ref=ref)
    return ProtocolError(
        "bad_message", f"invalid {kind!r} message: {shorten(_explain(detail), 200)}", ref=ref
    )


_RULES: Final = {
    "room": "room names are dot-separated tokens of letters, digits, '_' and '-' "
    "(wildcards '*' and a final '>' only in join, leave and who)",
    "name": "names are 1 to 64 letters, digits, '_', '-', '.' or '@'",
    "to": "names are 1 to 64 letters, digits, '_', '-', '.' or '@'",
}


def _explain(detail: str) -> str:
    # msgspec reports a failed pattern as the raw regex: say the rule in words instead.
    if "matching regex" in detail and "`$." in detail:
        field = detail.rsplit("`$.", 1)[1].rstrip("`")
        if field in _RULES:
            return f"bad {field!r}: {_RULES[field]}"
    return detail
