"""The cluster's rules, sans-I/O: subjects, records, and the numbering of a moved session.

Theory of operation
-------------------
Every message a node accepts is published once to one JetStream stream, and every node reads
the whole stream in stream order (one ordered consumer each) and delivers to its own sessions.
A session's sequence numbers are therefore a function of the stream: the n-th message of the
stream that *belongs* to the session is its seq n. A message belongs to a session when

- it is a direct to the session's name, stored after the session started (``start``), or
- it is a room message from another name, and one of the session's filters matching its room
  was in effect at its stream position: ``span.start < stream_seq <= span.end`` (``end`` is
  None while the filter is joined).

A filter takes effect at the last stream position the owner node had read when it carried
the join out, and ends at the one it had read at the leave: the node delivers by that very
rule, so any node holding the :class:`SessionRecord` can number the same messages the same
way. The record's checkpoint says "the session's seq ``seq`` was the message at stream
position ``stream_seq``"; :class:`Renumbering` reads the stream after it and rebuilds what
the client has not acknowledged, for a resume on another node.

Nothing here reads a clock, opens a socket or logs.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, TypeVar

import msgspec

from securemsg.core.rooms import RoomRegistry, filter_matches

__all__ = [
    "DIRECT_PREFIX",
    "MSG_ID_HEADER",
    "ROOM_PREFIX",
    "STREAM_SUBJECTS",
    "Checkpoints",
    "CongestedElsewhere",
    "CongestionNote",
    "FilterSpan",
    "NameClaim",
    "NodeBeat",
    "PresenceNote",
    "ReliefNote",
    "Renumbering",
    "SessionRecord",
    "WhoAnswer",
    "belongs",
    "direct_subject",
    "directs_subject",
    "filter_subject",
    "live_nodes",
    "message_id",
    "name_key",
    "node_token",
    "parse_subject",
    "room_subject",
    "session_key",
    "stream_pending",
    "stream_position",
]

ROOM_PREFIX: Final = "sm.r."
DIRECT_PREFIX: Final = "sm.d."
STREAM_SUBJECTS: Final = ("sm.r.>", "sm.d.>")


# -- subjects and keys ----------------------------------------------------------------------
# Room names are NATS-safe already (tokens of letters, digits, '_' and '-' joined by '.');
# a client name may hold '.', the NATS token separator, and '@', which KV keys refuse: each
# is replaced by a character the name rule does not allow, so the mapping is reversible.


def _subject_token(name: str) -> str:
    return name.replace(".", "%")


def room_subject(sender: str, room: str) -> str:
    """The stream subject of a publish: the sender first, so a node can tell a member its
    own message without parsing the body."""
    return f"{ROOM_PREFIX}{_subject_token(sender)}.{room}"


def direct_subject(to: str, sender: str) -> str:
    """The stream subject of a direct: the recipient first (a session's filter is
    ``sm.d.<name>.*``), then the sender (for flow control)."""
    return f"{DIRECT_PREFIX}{_subject_token(to)}.{_subject_token(sender)}"


def directs_subject(to: str) -> str:
    """The NATS subject filter of every direct to ``to``."""
    return f"{DIRECT_PREFIX}{_subject_token(to)}.*"


def filter_subject(room_filter: str) -> str:
    """The NATS subject filter of a room filter (``*`` and a final ``>`` mean the same)."""
    return f"{ROOM_PREFIX}*.{room_filter}"


def parse_subject(subject: str) -> tuple[Literal["r", "d"], str, str]:
    """``("r", sender, room)`` or ``("d", sender, recipient)``; ValueError for anything else."""
    if subject.startswith(ROOM_PREFIX):
        sender, _, room = subject[len(ROOM_PREFIX) :].partition(".")
        if room:
            return "r", sender.replace("%", "."), room
    elif subject.startswith(DIRECT_PREFIX):
        to, _, sender = subject[len(DIRECT_PREFIX) :].partition(".")
        if sender:
            return "d", sender.replace("%", "."), to.replace("%", ".")
    raise ValueError(f"not a securemsg stream subject: {subject!r}")


def stream_pending(reply: str) -> int:
    """How many more messages the stream holds for the consumer, from the same reply
    subject as :func:`stream_position` (its ``<pending>`` token). ValueError for anything
    else."""
    tokens = reply.split(".")
    if tokens[0] != "$JS" or tokens[1] != "ACK" or len(tokens) not in (9, 11, 12):
        raise ValueError(f"not a JetStream delivery: {reply!r}")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


def stream_position(reply: str) -> int:
    """The stream sequence number in the reply subject of a JetStream delivery:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``,
    or with a domain and an account hash after ``$JS.ACK`` (12 tokens, or 11). Cheaper than
    nats-py's ``Msg.metadata``, which parses every field and a timestamp: this is read once
    per stream message on every node. ValueError for anything else."""
    tokens = reply.split(".", 8)
    if tokens[0] != "$JS" or tokens[1] != "ACK" or len(tokens) < 9:
        raise ValueError(f"not a JetStream delivery: {reply!r}")
    if tokens[8].count(".") == 0:  # the 9-token form
        return int(tokens[5])
    return int(tokens[7])


MSG_ID_HEADER: Final = "Nats-Msg-Id"
#: Join and leave ids a session record keeps (SessionRecord.recent).
RECENT_REQUESTS: Final = 64


def name_key(name: str) -> str:
    """A client name as a KV key (letters, digits, ``-/_=.``)."""
    return name.replace("@", "=")


def session_key(token: str) -> str:
    """What the cluster knows a session by: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def node_token(node: str) -> str:
    """A node's name as one subject token and KV key."""
    return hashlib.sha256(node.encode()).hexdigest()[:16]


def message_id(key: str, request_id: str) -> str:
    """The ``Nats-Msg-Id`` of a request: a resend, to any node, within JetStream's duplicate
    window is stored once. Request ids restart with each new session of a client, hence the
    session's key."""
    return f"{key[:24]}:{request_id}"


# -- records (JSON in the key-value buckets and on core subjects) ----------------------------


class FilterSpan(msgspec.Struct, array_like=True):
    filter: str
    start: int
    end: int | None = None


class SessionRecord(msgspec.Struct, kw_only=True):
    """What outlives the node holding the session (bucket ``sm_sessions``, key
    :func:`session_key`)."""

    name: str
    owner: str
    owner_boot: str = ""
    #: The stream position the session started at: directs after it are its own.
    start: int
    filters: list[FilterSpan] = msgspec.field(default_factory=list)
    #: The checkpoint: the session's ``seq`` was the message at ``stream_seq``.
    stream_seq: int = 0
    seq: int = 0
    #: Wall-clock time the session lost its connection; None while connected.
    detached_at: float | None = None
    #: The ids of its last joins and leaves (at most RECENT_REQUESTS): the node it moves to
    #: knows their resends as duplicates (publishes have JetStream's Nats-Msg-Id for that).
    recent: list[str] = msgspec.field(default_factory=list)

    def requested(self, ref: str) -> None:
        if ref not in self.recent:
            self.recent.append(ref)
            del self.recent[:-RECENT_REQUESTS]

    def joined(self, room_filter: str, position: int) -> None:
        self.filters.append(FilterSpan(room_filter, position))

    def left(self, room_filter: str, position: int) -> None:
        for span in self.filters:
            if span.filter == room_filter and span.end is None:
                span.end = position

    def trim(self, before: int) -> None:
        """Forget filters that ended at or before the checkpoint: no replay reads that far."""
        self.filters = [s for s in self.filters if s.end is None or s.end > before]


class NameClaim(msgspec.Struct, kw_only=True):
    """Bucket ``sm_names``, key :func:`name_key`: who holds a name cluster-wide."""

    node: str
    session: str
    connected: bool = True
    boot: str = ""


class NodeBeat(msgspec.Struct, kw_only=True):
    """Bucket ``sm_nodes``: a node says it is alive, and where clients reach it."""

    node: str
    address: str
    #: Drawn at each start: a node restarted under its name is another incarnation, and
    #: the sessions and names of the one before are a dead node's.
    boot: str = ""


class PresenceNote(msgspec.Struct, array_like=True):
    room: str
    name: str
    event: str
    node: str


class WhoAnswer(msgspec.Struct, array_like=True):
    node: str
    names: list[str]


class CongestionNote(msgspec.Struct, array_like=True):
    """``sm.congested``: a session of ``node`` is congested by publishers of other nodes
    (sent when it becomes so, and again every beat while it lasts)."""

    node: str
    #: The session's key (:func:`session_key`), its name (directs) and its filters (rooms).
    session: str
    name: str
    filters: list[str]


class ReliefNote(msgspec.Struct, array_like=True):
    """``sm.relieved``: the session is no longer congested, or it ended or left the node."""

    node: str
    session: str


# -- membership and numbering ----------------------------------------------------------------


def belongs(record: SessionRecord, kind: str, sender: str, target: str, stream_seq: int) -> bool:
    """Is the stream message from ``sender`` to ``target`` (a room for ``kind`` "r", a name
    for "d") at ``stream_seq`` one of the session's deliveries? (See the module doc.)"""
    if kind == "d":
        return target == record.name and stream_seq > record.start
    if sender == record.name:
        return False  # a publisher is not sent its own message
    for span in record.filters:
        if span.start < stream_seq and (span.end is None or stream_seq <= span.end):
            if filter_matches(span.filter, target):
                return True
    return False


@dataclass
class Renumbering:
    """Rebuild a moved session's numbering from its record: feed the stream messages after
    the checkpoint in order, up to position ``upto`` (where the new node takes over); what
    the client lacks (seq above ``last_seq``) is kept in :attr:`replay`."""

    record: SessionRecord
    last_seq: int
    upto: int
    seq: int = field(init=False)
    #: (seq, stream_seq, payload) of each message the client has not got, in order.
    replay: list[tuple[int, int, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seq = self.record.seq

    @property
    def possible(self) -> bool:
        """False when the client claims less than the checkpoint (it acknowledged more than
        it says it has): the session cannot be resumed."""
        return self.last_seq >= self.record.seq

    def feed(self, stream_seq: int, subject: str, payload: bytes) -> bool:
        """One stream message; False once past ``upto`` (stop reading)."""
        if stream_seq > self.upto:
            return False
        if stream_seq <= self.record.stream_seq:
            return True
        kind, sender, target = parse_subject(subject)
        if belongs(self.record, kind, sender, target, stream_seq):
            self.seq += 1
            if self.seq > self.last_seq:
                self.replay.append((self.seq, stream_seq, payload))
        return True

    @property
    def consistent(self) -> bool:
        """The client has no seq the stream does not account for (else: a gap, not a resume)."""
        return self.possible and self.last_seq <= self.seq


class Checkpoints:
    """Which stream position each of a session's numbered messages was, until acknowledged:
    the checkpoint for a given ``acked`` is the last pair at or below it."""

    __slots__ = ("_pairs", "seq", "stream_seq")

    def __init__(self, *, stream_seq: int, seq: int) -> None:
        self.stream_seq = stream_seq
        self.seq = seq
        self._pairs: deque[tuple[int, int]] = deque()

    def numbered(self, seq: int, stream_seq: int) -> None:
        self._pairs.append((seq, stream_seq))

    def acked(self, acked: int) -> bool:
        """Move the checkpoint to ``acked``; True when it moved."""
        pairs = self._pairs
        moved = False
        while pairs and pairs[0][0] <= acked:
            self.seq, self.stream_seq = pairs.popleft()
            moved = True
        return moved


def live_nodes(heard: Mapping[str, float], *, now: float, timeout: float) -> list[str]:
    """The nodes heard from within ``timeout`` seconds of ``now``, sorted."""
    return sorted(node for node, at in heard.items() if now - at <= timeout)


def merge_names(answers: Iterable[list[str]]) -> list[str]:
    return sorted({name for names in answers for name in names})


# -- flow control across nodes ---------------------------------------------------------------

M = TypeVar("M", bound=Hashable)


@dataclass(slots=True)
class _Congested(Generic[M]):
    node: str
    name: str
    filters: frozenset[str]
    heard_at: float
    member: M


class CongestedElsewhere(Generic[M]):
    """The sessions of other nodes that said they are congested, each standing here as a
    ``member`` (a placeholder the driver makes) that a local publisher can wait for.

    A publish reaches one when a filter of it matches the room and it is not the sender; a
    direct when it has the name. An entry lasts while its notes keep coming: it goes with a
    relief note, when not heard for ``ttl`` seconds (its node stopped re-announcing it, or
    missed the relief note), or when its node is dead.
    """

    __slots__ = ("_by_name", "_rooms", "by_key", "ttl")

    def __init__(self, *, ttl: float) -> None:
        self.ttl = ttl
        #: By session key; empty (falsy) in the common case: the hot path tests only that.
        self.by_key: dict[str, _Congested[M]] = {}
        self._by_name: dict[str, M] = {}
        self._rooms: RoomRegistry[M] = RoomRegistry()

    def __len__(self) -> int:
        return len(self.by_key)

    def heard(self, note: CongestionNote, *, now: float, make: Callable[[], M]) -> M:
        """A congestion note: the session is (still) congested, with these filters now."""
        filters = frozenset(note.filters)
        entry = self.by_key.get(note.session)
        if entry is None:
            entry = _Congested(note.node, note.name, frozenset(), now, make())
            self.by_key[note.session] = entry
        entry.heard_at, entry.node = now, note.node
        member = entry.member
        if entry.name != note.name:
            self._drop_name(entry)
            entry.name = note.name
        self._by_name[note.name] = member
        for gone in entry.filters - filters:
            self._rooms.leave(member, gone)
        for new in filters - entry.filters:
            self._rooms.join(member, new)
        entry.filters = filters
        return member

    def relieved(self, key: str) -> M | None:
        """A relief note: the placeholder whose waiters may go on, if it was known."""
        entry = self.by_key.pop(key, None)
        if entry is None:
            return None
        self._rooms.leave_all(entry.member)
        self._drop_name(entry)
        return entry.member

    def expired(self, *, now: float, live: Callable[[str], bool]) -> list[M]:
        """Forget the entries not heard for ``ttl`` or whose node is dead; their placeholders."""
        stale = [
            key
            for key, entry in self.by_key.items()
            if now - entry.heard_at > self.ttl or not live(entry.node)
        ]
        return [member for key in stale if (member := self.relieved(key)) is not None]

    def reached(self, kind: str, sender: str, target: str) -> list[M]:
        """The congested sessions a publish (``kind`` "r", ``target`` its room) or a direct
        ("d", ``target`` the name) from ``sender`` reaches."""
        if kind == "d":
            member = self._by_name.get(target)
            return [] if member is None else [member]
        own = self._by_name.get(sender)  # a session is not sent its own message
        return [member for member in self._rooms.match(target) if member is not own]

    def _drop_name(self, entry: _Congested[M]) -> None:
        if self._by_name.get(entry.name) is entry.member:
            del self._by_name[entry.name]
