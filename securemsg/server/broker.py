"""Routing across sessions: rooms, presence, ``who``, direct messages by name, and the
registry of sessions by name and by token (resume, takeover, expiry).

The broker owns no socket and no clock. The rules of one session (the hello policy,
deduplication, acks, the rate limit, replay, overflow) are
:class:`~securemsg.core.server_session.ServerSession`'s; the broker is the router that
session passes its requests to. A connected session has a :class:`Link` (the driver's
connection) to which whole frames are queued; a disconnected one keeps its messages in its
:class:`~securemsg.core.delivery.DeliveryLog` until it resumes or expires.
"""

from __future__ import annotations

import binascii
import itertools
import os
from collections.abc import Sequence
from typing import Protocol

import structlog

from securemsg._compiled import mypyc_attr
from securemsg.core.delivery import message_prefix, splice_frame
from securemsg.core.messages import (
    Delivery,
    Direct,
    ErrorCode,
    Hello,
    Members,
    Presence,
    Publish,
    encode,
    encode_frame_of,
)
from securemsg.core.rooms import RoomRegistry, is_wildcard
from securemsg.core.server_session import HelloPolicy, ServerSession
from securemsg.errors import ProtocolError
from securemsg.server.store import MemoryStore, SessionStore, StoredSession

__all__ = ["Broker", "Link", "Opened", "session_token"]

logger = structlog.get_logger("securemsg.server.broker")

#: What one remembered request id may cost, at most: a str of up to 128 characters (49 bytes
#: of header) and its slot in a set.
DEDUP_ID_BYTES = 208

_URLSAFE = bytes.maketrans(b"+/", b"-_")


def session_token() -> str:
    """A new session's resume token: 18 bytes from ``os.urandom``, URL-safe base64 (what
    ``secrets.token_urlsafe(18)`` gives, with C calls only instead of eight Python ones:
    this runs for every new session)."""
    return binascii.b2a_base64(os.urandom(18), newline=False).translate(_URLSAFE).decode()


class Link(Protocol):
    """What the broker needs of a live connection."""

    #: False while the connection's write buffer is full: deliveries then wait in the
    #: session's delivery log, and the connection sends them when it drains.
    writable: bool

    def queue(self, frame: bytes) -> None:
        """Queue one whole frame; the driver batches the writes."""

    def queue_message(self, frame: bytes) -> None:
        """Queue one whole ``message`` frame (a delivery): consecutive ones may leave as one
        ``batch`` frame when the client speaks protocol 3."""

    def queue_delivery(self, prefix: bytes, seq: int) -> None:
        """:meth:`queue_message` of ``splice_frame(prefix, seq)``, made as the connection
        needs it (the hot path: a batch takes the payload alone)."""

    def pause_reading(self) -> None:
        """Carry out nothing more this connection sends until :meth:`resume_reading`
        (acknowledgements excepted): a session it publishes to is congested."""

    def resume_reading(self) -> None: ...

    def close_with(self, code: str, message: str) -> None:
        """Send an ``error`` frame with a fatal code and close."""


Session = ServerSession[Link]


class Opened:
    """What :meth:`Broker.open` gives the connection: the session and what to replay."""

    # A plain class, not a frozen dataclass: compiled, a frozen dataclass's __init__ stays a
    # Python function (object.__setattr__ per field), and this is made for every hello.
    __slots__ = ("replay", "resumed", "session", "took_over")

    def __init__(
        self, session: Session, *, resumed: bool, replay: list[bytes], took_over: bool
    ) -> None:
        self.session = session
        self.resumed = resumed
        self.replay = replay
        #: True when another live connection held this session and was closed for it.
        self.took_over = took_over


# The cluster's registry (and tests) subclass it in Python, also when it is compiled.
@mypyc_attr(allow_interpreted_subclasses=True)
class Broker:
    """Every session of this server, by name and by token, and the rooms: carries out the
    requests a :class:`ServerSession` passes on (it is the sessions' router)."""

    def __init__(
        self,
        *,
        max_pending: int = 10_000,
        max_pending_bytes: int = 1 << 62,
        dedup_window: int = 10_000,
        session_ttl: float = 60.0,
        max_msgs_per_sec: float = 0.0,
        token: str | None = None,
        require_identity: bool = False,
        store: SessionStore | None = None,
        max_subscriptions: int = 1 << 62,
        max_frame: int = 1 << 20,
        max_sessions: int = 1 << 62,
        max_disconnected_bytes: int = 1 << 62,
    ) -> None:
        #: True when a hello is carried out by :meth:`open_later` (a cluster node), not
        #: :meth:`open`. Set per instance: compiled code reads a native class's attribute
        #: from its instance, where an interpreted subclass's class attribute is not seen.
        self.opens_later = False
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.dedup_window = dedup_window
        self.session_ttl = session_ttl
        self.max_msgs_per_sec = max_msgs_per_sec
        self.max_subscriptions = max_subscriptions
        self.max_frame = max_frame
        self.max_sessions = max_sessions
        self.max_disconnected_bytes = max_disconnected_bytes
        #: Disconnected sessions, longest disconnected first (each with the bytes its dedup
        #: set is counted for), and the bytes they hold (delivery logs and dedup sets): past
        #: max_sessions or max_disconnected_bytes the first ones end.
        self.disconnected: dict[Session, int] = {}
        self.disconnected_bytes = 0
        self.policy = HelloPolicy(
            token=token.encode() if token else None, require_identity=require_identity
        )
        self.rooms: RoomRegistry[Session] = RoomRegistry()
        self.by_name: dict[str, Session] = {}
        self.by_token: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self._next_id = 1  # session ids continue above those a store gives back
        self.messages_routed = 0
        #: Publishes and directs carried out (resends not counted), for the metrics.
        self.messages_received = 0
        #: Congested sessions that publishers wait for (flow control).
        self.stalled: set[Session] = set()
        #: Where sessions outlive the process (a no-op unless the server has ``--store``).
        self.store: SessionStore = store if store is not None else MemoryStore()
        self._durable = self.store.durable

    # -- sessions -----------------------------------------------------------------------------

    def open(self, hello: Hello, *, identity: str | None, link: Link, now: float) -> Opened:
        """Accept a ``hello`` (a new session, or a resume) or raise :class:`ProtocolError`
        with the code to refuse it with."""
        name = self.policy.admit(hello, identity=identity)
        if hello.session is not None:
            session = self.by_token.get(hello.session)
            if session is not None and session.name == name:
                return self._resume(session, hello.last_seq or 0, link, now)
        holder = self.by_name.get(name)
        if holder is not None:
            if holder.link is not None:
                raise ProtocolError(ErrorCode.NAME_TAKEN, f"the name {name!r} is in use")
            self.end(holder, reason="taken_over")
        if len(self.by_token) >= self.max_sessions and not self._evict_oldest("max_sessions"):
            raise ProtocolError(
                ErrorCode.SERVER_BUSY,
                f"the server holds {self.max_sessions} sessions (max_sessions), all connected",
            )
        session = ServerSession(
            sid=f"s{next(self._ids)}",
            name=name,
            token=session_token(),
            max_pending=self.max_pending,
            max_pending_bytes=self.max_pending_bytes,
            dedup_window=self.dedup_window,
            rate=self.max_msgs_per_sec,
            max_subscriptions=self.max_subscriptions,
        )
        session.attach(link, now)
        self.by_name[name] = session
        self.by_token[session.token] = session
        self.store.session_created(session.id, name=name, token=session.token)
        return Opened(session, resumed=False, replay=[], took_over=False)

    async def open_later(
        self, hello: Hello, *, identity: str | None, link: Link, now: float
    ) -> Opened:
        """:meth:`open` for a broker that must ask others first (see :attr:`opens_later`)."""
        return self.open(hello, identity=identity, link=link, now=now)

    def nodes(self) -> list[str] | None:
        """The addresses a ``welcome`` advertises (a cluster's live nodes); None alone."""
        return None

    def _resume(self, session: Session, last_seq: int, link: Link, now: float) -> Opened:
        self._reconnected(session)
        self._stop_waiting(session)  # what the old connection held died with it
        old = session.link
        if old is not None:
            # The client came back before we noticed its old connection die. Unlinked first:
            # the old connection sends the acks it holds as it closes.
            session.link = None
            old.close_with(
                ErrorCode.SESSION_TAKEN_OVER, "the session resumed on another connection"
            )
        session.attach(link, now)
        replay = session.replay(last_seq)
        if self._durable:
            self.store.session_attached(session.id)
            self.store.acked(session.id, session.delivery.acked)
        return Opened(session, resumed=True, replay=replay, took_over=old is not None)

    def detach(self, session: Session, link: Link, now: float, *, wall: float = 0.0) -> None:
        """The session's connection is gone: keep the session until ``now + session_ttl``.
        What it had published and not yet carried out died with the connection (the client
        resends it), so it waits for nobody any more."""
        if session.detach(link, expires_at=now + self.session_ttl):
            self._stop_waiting(session)
            if self._durable:
                self.store.session_detached(session.id, expires_at=wall + self.session_ttl)
            # A dedup set does not change while disconnected: counted once, at its largest.
            dedup_bytes = self.disconnected[session] = len(session.recent) * DEDUP_ID_BYTES
            self.disconnected_bytes += session.delivery.pending_bytes + dedup_bytes
            self._trim_disconnected()

    def _reconnected(self, session: Session) -> None:
        """``session`` is connected again, or ended: it no longer counts as disconnected."""
        dedup_bytes = self.disconnected.pop(session, None)
        if dedup_bytes is not None:
            self.disconnected_bytes -= session.delivery.pending_bytes + dedup_bytes

    def _trim_disconnected(self) -> None:
        # Bounded: each turn ends one session, and none left means no bytes counted.
        while self.disconnected_bytes > self.max_disconnected_bytes:
            if not self._evict_oldest("max_disconnected_bytes"):
                break

    def _evict_oldest(self, limit: str) -> bool:
        """End the session disconnected longest (its client learns of the gap when it
        comes back, as after expiry); False when no session is disconnected."""
        if not self.disconnected:
            return False
        session = next(iter(self.disconnected))
        logger.warning(
            "session_evicted",
            session=session.id,
            name=session.name,
            limit=limit,
            pending=len(session.delivery),
            pending_bytes=session.delivery.pending_bytes,
        )
        self.end(session, reason="evicted")
        # Freed now, not when its expiry timer would have fired.
        session.delivery.ack(session.delivery.last_seq)
        return True

    def end(self, session: Session, *, reason: str) -> list[str]:
        """Forget a session: its memberships end (with presence) and it cannot resume."""
        self._reconnected(session)
        if self.by_name.get(session.name) is session:
            del self.by_name[session.name]
        self.by_token.pop(session.token, None)
        filters = self.rooms.leave_all(session)
        for room_filter in filters:
            self._presence(session, room_filter, "leave")
        session.expires_at = None
        self._stop_waiting(session)
        self.relieved(session)
        self.store.session_ended(session.id)
        return filters

    # -- requests (the sessions' router) ------------------------------------------------------

    def join(self, session: Session, room_filter: str, *, ref: str | None = None) -> None:
        if self.rooms.join(session, room_filter):
            self._presence(session, room_filter, "join")
            if self._durable:
                self.store.joined(session.id, room_filter)

    def subscription_count(self, session: Session) -> int:
        return self.rooms.subscription_count(session)

    def subscriptions(self, session: Session) -> frozenset[str]:
        return self.rooms.filters_of(session)

    def leave(self, session: Session, room_filter: str, *, ref: str | None = None) -> bool:
        """False when the session was not a member."""
        if not self.rooms.leave(session, room_filter):
            return False
        self._presence(session, room_filter, "leave")
        if self._durable:
            self.store.left(session.id, room_filter)
        return True

    def who(self, room_filter: str, ref: str | None, session: Session | None = None) -> bytes:
        """The ``members`` frame: the names, sorted, as many as fit ``max_frame`` (the rest
        cut, and ``truncated`` says so: a client cannot read a larger frame)."""
        names = sorted({member.name for member in self.rooms.members(room_filter)})
        return self.members_frame(room_filter, names, ref)

    def members_frame(self, room_filter: str, names: list[str], ref: str | None) -> bytes:
        """``names`` (sorted) as a ``members`` frame that fits ``max_frame``."""
        frame = encode_frame_of(Members(room=room_filter, names=names, ref=ref))
        if len(frame) - 4 <= self.max_frame:
            return frame
        empty = encode_frame_of(Members(room=room_filter, names=[], ref=ref, truncated=True))
        room = self.max_frame - (len(empty) - 4)
        kept = 0
        for name in names:  # names are ASCII (the name rule): one byte a character
            room -= len(name) + 3  # "name" and a comma
            if room < 0:
                break
            kept += 1
        return encode_frame_of(
            Members(room=room_filter, names=names[:kept], ref=ref, truncated=True)
        )

    def publish(self, session: Session, msg: Publish, ts: float) -> None:
        self.messages_received += 1
        members = self.rooms.match(msg.room)
        if members and (len(members) > 1 or members[0] is not session):
            # Delivery.of_publish, inlined (a call less per message): the same fields.
            message = Delivery(
                room=msg.room,
                sender=session.name,
                body=msg.body,
                id=msg.id,
                reply_to=msg.reply_to,
                ts=ts,
                seq=0,
            )
            # Encoded once for every recipient; only the sequence number is spliced in.
            # message_prefix without its check (seq, 0 here, is the last field; the tests
            # of message_prefix and of every delivery would fail were it not): ~2 % of the
            # route was that check.
            prefix = encode(message)[:-2]
            if self._durable:
                self._deliver_stored(session, members, prefix)
                return
            deliver = self.deliver
            for member in members:
                if member is not session:
                    deliver(member, prefix)
                    if member.delivery.congested:
                        self._wait(session, member)

    def direct(self, session: Session, msg: Direct, ts: float) -> int:
        """False when nobody has that name."""
        target = self.by_name.get(msg.to)
        if target is None:
            return False
        self.messages_received += 1
        message = Delivery.of_direct(msg, sender=session.name, ts=ts)
        prefix = message_prefix(encode(message))
        if self._durable:
            self._deliver_stored(session, (target,), prefix)
            return True
        self.deliver(target, prefix)
        if target.delivery.congested:
            self._wait(session, target)
        return True

    def publish_datagram(self, prefix: bytes, room: str) -> tuple[int, int]:
        """A ``publish`` that came over the datagram channel (``prefix`` is its encoded
        ``message``, tagged ``datagram``, before its ``seq``) to the sessions in ``room``:
        at most once and never pushing back. A member that is not connected, or congested
        (half way to its limits), misses it. Returns (delivered, missed)."""
        self.messages_received += 1
        delivered = missed = 0
        recipients = []
        for member in self.rooms.match(room):
            log = member.delivery
            # Never the overflow rule (which ends a session) for a message that may be lost.
            if (
                member.link is None
                or log.congested
                or log.pending_bytes + len(prefix) > log.max_pending_bytes
            ):
                missed += 1
                continue
            seq = self.deliver(member, prefix)
            if seq:
                delivered += 1
                recipients.append((member.id, seq))
        if recipients and self._durable:
            # Numbered messages must be stored, or a restart would number others the same.
            self.store.message_accepted(prefix, recipients)
        return delivered, missed

    def deliver(self, session: Session, prefix: bytes) -> int:
        """Number ``prefix`` for ``session`` and send it if its connection can take it now;
        its sequence number, or 0 when it overflowed the session (which ended)."""
        log = session.delivery
        seq = log.append(prefix)
        if not seq:  # max_pending (or max_pending_bytes) unacknowledged already
            self.overflow(session)
            return 0
        self.messages_routed += 1
        link = session.link
        if link is None and session in self.disconnected:
            self.disconnected_bytes += len(prefix)
            self._trim_disconnected()
            # 0 when that ended this very session: nothing is kept (or stored) for it.
            return seq if session in self.disconnected else 0
        # Only in order: while earlier ones wait for the connection to drain, so does this.
        if link is not None and link.writable and log.sent_seq == seq - 1:
            log.sent_seq = seq
            if self._durable:
                # A numbered message leaves only once stored: after a crash the number
                # must not be given to another message the client would take for a repeat.
                self.store.after_commit(link.queue_message, splice_frame(prefix, seq))
            else:
                link.queue_delivery(prefix, seq)
        return seq

    def _deliver_stored(self, sender: Session, members: Sequence[Session], prefix: bytes) -> None:
        """``publish``/``direct`` with a durable store: the message is stored once, with the
        sequence number it has for each recipient."""
        recipients = []
        for member in members:
            if member is not sender:
                seq = self.deliver(member, prefix)
                if seq:
                    recipients.append((member.id, seq))
                if member.delivery.congested:
                    self._wait(sender, member)
        if recipients:
            self.store.message_accepted(prefix, recipients)

    # -- restart ------------------------------------------------------------------------------

    def restore(self, stored: StoredSession, *, now: float, wall: float) -> Session:
        """Rebuild a session kept by the store (a restart): disconnected, its rooms joined
        again without presence, expiring as it would have (a session that was connected
        when the server stopped gets a whole ``session_ttl``)."""
        session = ServerSession[Link](
            sid=stored.id,
            name=stored.name,
            token=stored.token,
            max_pending=self.max_pending,
            max_pending_bytes=self.max_pending_bytes,
            dedup_window=self.dedup_window,
            rate=self.max_msgs_per_sec,
        )
        session.delivery.restore(
            last_seq=stored.last_seq, acked=stored.acked, pending=stored.pending
        )
        for msg_id in stored.recent_ids:
            session.recent.seen(msg_id)
        for room_filter in stored.filters:
            self.rooms.join(session, room_filter)
        left = self.session_ttl if stored.expires_at is None else stored.expires_at - wall
        session.expires_at = now + max(0.0, min(left, self.session_ttl))
        self.by_name[session.name] = session
        self.by_token[session.token] = session
        number = int(stored.id[1:]) if stored.id[1:].isdigit() else 0
        if number >= self._next_id:
            self._next_id = number + 1
            self._ids = itertools.count(self._next_id)
        return session

    # -- flow control -------------------------------------------------------------------------

    def _wait(self, publisher: Session, congested: Session) -> None:
        """``publisher`` just made ``congested`` congested (or more so): it publishes no more
        until ``congested`` is relieved, cut or gone. Its connection stops carrying out
        requests, TCP pushes back, and the client's publish waits on its bounded outbox."""
        if publisher is congested or publisher.link is None:
            return
        if congested.link is None and congested.expires_at is None:
            return  # it ended (overflowed): nothing to wait for
        waiting_on = publisher.waiting_on
        if waiting_on is None:
            waiting_on = publisher.waiting_on = set()
        elif congested in waiting_on:
            return
        waiting_on.add(congested)
        waiters = congested.waiters
        if waiters is None:
            waiters = congested.waiters = set()
        waiters.add(publisher)
        self.stalled.add(congested)
        if len(waiting_on) == 1:
            publisher.link.pause_reading()

    def relieved(self, session: Session) -> None:
        """``session`` is no longer congested (acks brought it down, or it ended): the
        publishers that waited for it alone go on."""
        waiters = session.waiters
        session.waiters = session.stalled_since = None
        self.stalled.discard(session)
        if not waiters:
            return
        for publisher in waiters:
            waiting_on = publisher.waiting_on
            if waiting_on is None:
                continue
            waiting_on.discard(session)
            if not waiting_on:
                publisher.waiting_on = None
                if publisher.link is not None:
                    publisher.link.resume_reading()

    def _stop_waiting(self, publisher: Session) -> None:
        waiting_on, publisher.waiting_on = publisher.waiting_on, None
        for congested in waiting_on or ():
            if congested.waiters is not None:
                congested.waiters.discard(publisher)
                if not congested.waiters:
                    self.relieved(congested)

    def check_stalled(self, now: float, timeout: float) -> list[Session]:
        """Cut every congested session that publishers wait for and that acknowledged
        nothing for ``timeout`` seconds (the slow-consumer rule); return those cut. Called
        periodically: a session is timed from the first call that sees it stalled."""
        cut = []
        for session in list(self.stalled):
            since = session.stalled_since
            if since is None:
                session.stalled_since = now
            elif now - max(since, session.acked_at) >= timeout:
                self.cut(session, stalled=now - max(since, session.acked_at))
                cut.append(session)
        return cut

    def cut(self, session: Session, *, stalled: float) -> None:
        """End a slow consumer: a stuck reader does not hold its publishers hostage (its
        session ends, so a resume learns of the gap)."""
        logger.warning(
            "slow_consumer",
            session=session.id,
            name=session.name,
            pending=len(session.delivery),
            pending_bytes=session.delivery.pending_bytes,
            stalled=round(stalled, 3),
            waiting_publishers=len(session.waiters or ()),
        )
        link = session.link
        session.link = None
        self.end(session, reason="slow_consumer")
        if link is not None:
            link.close_with(
                ErrorCode.SLOW_CONSUMER,
                f"nothing acknowledged for {stalled:.1f} s while publishers waited",
            )

    def overflow(self, session: Session) -> None:
        """Past max_pending (or max_pending_bytes) the session ends: a later resume learns of
        the gap. Flow control keeps a session that reads from getting here."""
        log = session.delivery
        max_pending = log.max_pending
        logger.warning(
            "session_overflowed",
            session=session.id,
            name=session.name,
            pending=len(log),
            pending_bytes=log.pending_bytes,
            max_pending=max_pending,
        )
        link = session.link
        session.link = None
        self.end(session, reason="overflowed")
        if link is not None:
            link.close_with(
                ErrorCode.SLOW_CONSUMER, f"more than {max_pending} messages unacknowledged"
            )

    def _presence(self, session: Session, room_filter: str, event: str) -> None:
        if is_wildcard(room_filter):
            audience = self.rooms.members(room_filter)
        else:
            audience = self.rooms.match(room_filter)
        others = [m for m in audience if m is not session and m.link is not None]
        if not others:
            return
        frame = encode_frame_of(
            Presence(room=room_filter, name=session.name, event=event)  # type: ignore[arg-type]
        )
        for member in others:
            member.link.queue(frame)  # type: ignore[union-attr]
