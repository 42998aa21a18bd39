"""Per-session delivery state, sans-I/O: sequence numbers, acknowledgements, deduplication.

Server side, :class:`DeliveryLog` numbers every message a session is sent and keeps it until
the client acknowledges it cumulatively, so a resumed session can be replayed after
``last_seq``. Stored entries are shared message *prefixes* (see :func:`splice_frame`): a
broadcast is encoded once and only the sequence number differs per recipient.

Client side (used by :class:`~securemsg.core.client_session.ClientSession`), :class:`Inbox`
drops messages whose sequence number was already delivered and says when an acknowledgement
is due; :class:`Outbox` keeps every sent message until the server answers its id, so it can
be resent after a reconnect.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Iterator

from securemsg.errors import ProtocolError

__all__ = [
    "DeliveryLog",
    "Inbox",
    "Outbox",
    "RecentIds",
    "message_prefix",
    "splice_frame",
    "splice_payload",
]

_pack_header = struct.Struct(">I").pack
_SEQ_TAIL = b',"seq":0}'


def message_prefix(payload: bytes) -> bytes:
    """Cut the encoded ``message`` (encoded with seq 0, which comes last) before its number."""
    if not payload.endswith(_SEQ_TAIL):
        raise ValueError("payload does not end with the sequence number")
    return payload[:-2]


def splice_frame(prefix: bytes, seq: int) -> bytes:
    """One whole frame: header, the shared prefix, then this recipient's sequence number."""
    tail = b"%d}" % seq
    return _pack_header(len(prefix) + len(tail)) + prefix + tail


def splice_payload(prefix: bytes, seq: int) -> bytes:
    """:func:`splice_frame` without the header: the payload, for a ``batch`` (see
    :meth:`securemsg.core.connection.Connection.send_relayed_payload`)."""
    return b"%s%d}" % (prefix, seq)


class DeliveryLog:
    """Outbound sequence numbers and unacknowledged messages of one server-side session.

    Bounded twice, in messages (``max_pending``) and in bytes (``max_pending_bytes``, the
    encoded prefixes kept). Half way to either bound the log is :attr:`congested`: the
    server stops reading from whoever publishes to it (flow control) until acknowledgements
    bring it down to a quarter of both bounds. :attr:`sent_seq` is how far the messages went
    to the connection; what lies beyond waits here while the connection's buffer is full.
    """

    __slots__ = (
        "_high",
        "_high_bytes",
        "_low",
        "_low_bytes",
        "_pending",
        "acked",
        "coming",
        "congested",
        "last_seq",
        "max_pending",
        "max_pending_bytes",
        "pending_bytes",
        "sent_seq",
    )

    def __init__(self, max_pending: int, max_pending_bytes: int = 1 << 62) -> None:
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._high = max(1, max_pending // 2)
        self._low = max_pending // 4
        self._high_bytes = max(1, max_pending_bytes // 2)
        self._low_bytes = max_pending_bytes // 4
        self.last_seq = 0
        self.acked = 0
        self.sent_seq = 0
        self.pending_bytes = 0
        self.congested = False
        #: Messages that may still come, counted toward congestion (:meth:`press`).
        self.coming = 0
        # Made on the first message and dropped once all are acknowledged: an empty deque
        # costs ~770 bytes, and most sessions are idle most of the time.
        self._pending: deque[tuple[int, bytes]] | tuple[()] = ()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return (
            len(self._pending) >= self.max_pending or self.pending_bytes >= self.max_pending_bytes
        )

    def append(self, prefix: bytes) -> int:
        """Number a message and keep it until acknowledged: its sequence number, or 0 when
        it does not fit (the overflow rule: the session must end, so that a later resume
        learns of the gap; nothing is dropped silently). A message always fits an empty log."""
        pending = self._pending
        size = self.pending_bytes + len(prefix)
        if pending and (len(pending) >= self.max_pending or size > self.max_pending_bytes):
            return 0
        self.last_seq = seq = self.last_seq + 1
        if not pending:  # () when empty (never an empty deque): see __init__
            pending = self._pending = deque()
        pending.append((seq, prefix))
        self.pending_bytes = size
        if len(pending) >= self._high or size >= self._high_bytes:
            self.congested = True
        return seq

    def press(self, coming: int) -> bool:
        """Count ``coming`` messages that may be on their way (a cluster node's unread
        stream) toward congestion: half way with them, the log is congested until its
        pending and :attr:`coming` (which the caller lowers as they arrive) are down to a
        quarter."""
        if len(self._pending) + coming >= self._high:
            self.congested = True
            self.coming = coming
        return self.congested

    def settle(self, coming: int) -> bool:
        """Fewer messages may still come than :meth:`press` counted (the node read on): True
        when that ended the congestion."""
        if coming >= self.coming:
            return False
        self.coming = coming
        if (
            self.congested
            and len(self._pending) + coming <= self._low
            and self.pending_bytes <= self._low_bytes
        ):
            self.congested = False
            self.coming = 0
            return True
        return False

    def ack(self, seq: int) -> bool:
        """Cumulative acknowledgement: every message up to ``seq`` arrived. True when this
        ended a congestion (see the class doc)."""
        if seq > self.last_seq:
            raise ProtocolError(
                "bad_message", f"ack of seq {seq} but only {self.last_seq} were sent"
            )
        if seq <= self.acked:
            return False
        self.acked = seq
        if self.sent_seq < seq:
            self.sent_seq = seq
        pending = self._pending
        if isinstance(pending, deque):
            size = self.pending_bytes
            while pending and pending[0][0] <= seq:
                size -= len(pending.popleft()[1])
            self.pending_bytes = size
            if not pending:
                self._pending = ()
        if (
            self.congested
            and len(pending) + self.coming <= self._low
            and self.pending_bytes <= self._low_bytes
        ):
            self.congested = False
            self.coming = 0
            return True
        return False

    def restore(self, *, last_seq: int, acked: int, pending: Iterable[tuple[int, bytes]]) -> None:
        """Take up where a stored session left off (a server restart with a store)."""
        self.last_seq = self.sent_seq = last_seq
        self.acked = acked
        kept = deque(pending)
        self._pending = kept if kept else ()
        self.pending_bytes = sum(len(prefix) for _, prefix in kept)
        self.congested = len(kept) >= self._high or self.pending_bytes >= self._high_bytes

    def unsent(self) -> list[bytes]:
        """The frames numbered but not yet handed to the connection, in order; they count as
        sent from now on."""
        start = self.sent_seq
        self.sent_seq = self.last_seq
        return [splice_frame(prefix, seq) for seq, prefix in self._pending if seq > start]

    def replay(self, last_seq: int) -> Iterator[tuple[int, bytes]]:
        """The messages after ``last_seq``, in order, for a resumed session (all of them count
        as sent from now on)."""
        self.ack(min(last_seq, self.last_seq))
        self.sent_seq = self.last_seq
        return iter(list(self._pending))


class RecentIds:
    """The ids of at least the last ``window`` client messages (at most twice that), to
    acknowledge a resend without delivering it twice.

    Two generations of sets: ids go into the current one; when it holds ``window`` it
    becomes the previous one and the one before is dropped. Two set lookups per message,
    cheaper than keeping exact order. Bounded: a client's outbox must not exceed the window.
    """

    __slots__ = ("_current", "_previous", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        # Made on first use: most sessions never publish with ids, and an empty set is ~200 B.
        self._current: set[str] | None = None
        self._previous: set[str] | None = None

    def seen(self, msg_id: str) -> bool:
        """True when ``msg_id`` was seen before; otherwise remember it and return False."""
        current = self._current
        if current is None:
            current = self._current = set()
        elif msg_id in current:
            return True
        previous = self._previous
        if previous is not None and msg_id in previous:
            return True
        if len(current) >= self.window:
            self._previous = current
            current = self._current = set()
        current.add(msg_id)
        return False

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in (self._current or ()) or msg_id in (self._previous or ())

    def forget(self, msg_id: str) -> None:
        if self._current is not None:
            self._current.discard(msg_id)
        if self._previous is not None:
            self._previous.discard(msg_id)

    def __len__(self) -> int:
        return len(self._current or ()) + len(self._previous or ())


class Inbox:
    """Client-side receive state: deduplication by sequence number, and what to acknowledge.

    ``last_seq`` is the highest received, ``acked`` the highest acknowledged: what the
    application took (see :meth:`ack_due`)."""

    __slots__ = ("acked", "last_seq")

    def __init__(self) -> None:
        self.last_seq = 0
        self.acked = 0

    def accept(self, seq: int) -> bool:
        """True for a new message; False for one already delivered (a replay overlap).

        A session numbers without holes and replays from ``last_seq`` on resume, so a seq
        above ``last_seq + 1`` does not happen; a gap shows only as ``resumed: false``."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        return True

    def ack_due(self, untaken: int | None = None) -> int | None:
        """The sequence number to acknowledge now, or None when nothing new is due.

        ``untaken`` is the ``seq`` of the oldest message the application has not taken yet:
        everything before it is acknowledged, nothing from it on. Without one, everything
        received is (what did not reach the application, replies and skipped messages, was
        dealt with on arrival)."""
        seq = self.last_seq if untaken is None else untaken - 1
        if seq > self.acked:
            self.acked = seq
            return seq
        return None

    def reset(self) -> None:
        """A new (not resumed) session numbers from 1 again."""
        self.last_seq = self.acked = 0

    def restore(self, seq: int) -> None:
        """Take up a session whose messages up to ``seq`` were dealt with (a session file)."""
        self.last_seq = self.acked = seq


class Outbox:
    """Client messages (whole frames) waiting for the server's ``ack``, in send order.

    Full at ``max_outbox`` messages or ``max_outbox_bytes`` bytes of frames, whichever comes
    first; a sender waits for acks then. One message always fits an empty outbox."""

    __slots__ = ("_frames", "_next_id", "bytes", "max_outbox", "max_outbox_bytes")

    def __init__(self, max_outbox: int, max_outbox_bytes: int = 1 << 62) -> None:
        self.max_outbox = max_outbox
        self.max_outbox_bytes = max_outbox_bytes
        # A plain dict keeps insertion order too, and adds and pops a quarter faster.
        self._frames: dict[str, bytes] = {}
        self._next_id = 0
        #: Bytes of the frames kept.
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def full(self) -> bool:
        return len(self._frames) >= self.max_outbox or self.bytes >= self.max_outbox_bytes

    def new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def add(self, msg_id: str, frame: bytes) -> None:
        self._frames[msg_id] = frame
        self.bytes += len(frame)

    def ack(self, msg_id: str) -> bool:
        """Drop an acknowledged message; False when the id was not pending."""
        frame = self._frames.pop(msg_id, None)
        if frame is None:
            return False
        self.bytes -= len(frame)
        return True

    def ack_all(self, msg_ids: Iterable[str]) -> None:
        """:meth:`ack` of each id (an ``ack`` frame holds up to 128: one call, not 128)."""
        pop = self._frames.pop
        freed = 0
        for msg_id in msg_ids:
            frame = pop(msg_id, None)
            if frame is not None:
                freed += len(frame)
        self.bytes -= freed

    def unacked(self) -> list[bytes]:
        """Every frame still waiting, in the order it was first sent, for a resend."""
        return list(self._frames.values())

    @property
    def next_id(self) -> int:
        """The number the last :meth:`new_id` gave."""
        return self._next_id

    def entries(self) -> list[tuple[str, bytes]]:
        """(id, frame) of every message still waiting, in send order."""
        return list(self._frames.items())

    def restore(self, *, next_id: int, entries: Iterable[tuple[str, bytes]]) -> None:
        """Take up what another process left unacknowledged (a session file); new ids
        continue after ``next_id`` so none repeats an id the server remembers."""
        for msg_id, frame in entries:
            self.add(msg_id, frame)
        self._next_id = max(self._next_id, next_id)
