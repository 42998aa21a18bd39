"""Sessions and routing: who gets which message, with what sequence number.

The broker owns no socket and no clock. A connected session has a :class:`Link` (the
driver's connection) to which whole frames are queued; a disconnected session keeps its
messages in its :class:`~securemsg.core.delivery.DeliveryLog` until it resumes or expires.
Decisions that are facts of the protocol (refusing a hello, routing, acks, presence) are made
here; the driver turns the results into writes, closes and log lines.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import structlog

from securemsg.core.delivery import DeliveryLog, RecentIds, message_prefix, splice_frame
from securemsg.core.messages import (
    PROTOCOL_VERSION,
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

__all__ = ["Broker", "Link", "Refused", "Session"]

logger = structlog.get_logger("securemsg.server.broker")


class Link(Protocol):
    """What the broker needs of a live connection."""

    def queue(self, frame: bytes) -> None:
        """Queue one whole frame; the driver batches the writes."""

    def ack(self, msg_id: str) -> None:
        """Acknowledge a client message; the driver sends acks in batches (``ServerAck``)."""

    def close_with(self, code: str, message: str) -> None:
        """Send an ``error`` frame with a fatal code and close."""


class Refused(Exception):
    """A ``hello`` the broker will not accept; ``code`` is the error frame's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Session:
    __slots__ = ("expires_at", "id", "link", "log", "name", "recent", "token")

    def __init__(self, *, sid: str, name: str, max_pending: int, dedup_window: int) -> None:
        self.id = sid
        self.name = name
        self.token = secrets.token_urlsafe(18)
        self.log = DeliveryLog(max_pending)
        self.recent = RecentIds(dedup_window)
        self.link: Link | None = None
        self.expires_at: float | None = None

    def __repr__(self) -> str:  # never show the token
        return f"Session({self.id}, {self.name!r}, connected={self.link is not None})"


@dataclass(frozen=True, slots=True)
class Opened:
    session: Session
    resumed: bool
    replay: list[bytes]
    #: True when another live connection held this session and was closed for it.
    took_over: bool


class Broker:
    def __init__(
        self,
        *,
        max_pending: int = 10_000,
        dedup_window: int = 10_000,
        session_ttl: float = 60.0,
        token: str | None = None,
        require_identity: bool = False,
    ) -> None:
        self.max_pending = max_pending
        self.dedup_window = dedup_window
        self.session_ttl = session_ttl
        self._token = token.encode() if token else None
        self.require_identity = require_identity
        self.rooms: RoomRegistry[Session] = RoomRegistry()
        self.by_name: dict[str, Session] = {}
        self.by_token: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self.messages_routed = 0

    # -- sessions -----------------------------------------------------------------------------

    def open(self, hello: Hello, *, identity: str | None, link: Link) -> Opened:
        """Accept or refuse a ``hello``; raises :class:`Refused` with the error code."""
        name = self._check_hello(hello, identity)
        if hello.session is not None:
            session = self.by_token.get(hello.session)
            if session is not None and session.name == name:
                return self._resume(session, hello.last_seq or 0, link)
        holder = self.by_name.get(name)
        if holder is not None:
            if holder.link is not None:
                raise Refused(ErrorCode.NAME_TAKEN, f"the name {name!r} is in use")
            self.end(holder, reason="taken_over")
        session = Session(
            sid=f"s{next(self._ids)}",
            name=name,
            max_pending=self.max_pending,
            dedup_window=self.dedup_window,
        )
        session.link = link
        self.by_name[name] = session
        self.by_token[session.token] = session
        return Opened(session, resumed=False, replay=[], took_over=False)

    def _check_hello(self, hello: Hello, identity: str | None) -> str:
        if hello.version != PROTOCOL_VERSION:
            raise Refused(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {hello.version} is not supported (this server speaks "
                f"{PROTOCOL_VERSION})",
            )
        if self._token is not None:
            offered = (hello.token or "").encode()
            if not hmac.compare_digest(offered, self._token):
                raise Refused(ErrorCode.UNAUTHORIZED, "the token is missing or wrong")
        if self.require_identity:
            if identity is None:
                raise Refused(ErrorCode.UNAUTHORIZED, "a client certificate is required")
            if hello.name is not None and hello.name != identity:
                raise Refused(
                    ErrorCode.UNAUTHORIZED,
                    f"the name {hello.name!r} differs from the certificate's {identity!r}",
                )
            return identity
        if hello.name is None:
            raise Refused(ErrorCode.BAD_MESSAGE, "'hello' needs a 'name'")
        return hello.name

    def _resume(self, session: Session, last_seq: int, link: Link) -> Opened:
        took_over = session.link is not None
        if session.link is not None:
            # The client came back before we noticed its old connection die.
            old, session.link = session.link, None
            old.close_with(
                ErrorCode.SESSION_TAKEN_OVER, "the session resumed on another connection"
            )
        session.link = link
        session.expires_at = None
        replay = [splice_frame(prefix, seq) for seq, prefix in session.log.replay(last_seq)]
        return Opened(session, resumed=True, replay=replay, took_over=took_over)

    def detach(self, session: Session, link: Link, now: float) -> None:
        """The session's connection is gone: keep the session until ``now + session_ttl``."""
        if session.link is link:
            session.link = None
            session.expires_at = now + self.session_ttl

    def end(self, session: Session, *, reason: str) -> list[str]:
        """Forget a session: its memberships end (with presence) and it cannot resume."""
        if self.by_name.get(session.name) is session:
            del self.by_name[session.name]
        self.by_token.pop(session.token, None)
        filters = self.rooms.leave_all(session)
        for room_filter in filters:
            self._presence(session, room_filter, "leave")
        session.expires_at = None
        return filters

    def expired(self, now: float) -> Iterator[Session]:
        """Disconnected sessions whose ttl has passed (the caller ends them)."""
        for session in list(self.by_token.values()):
            if session.link is None and session.expires_at is not None:
                if session.expires_at <= now:
                    yield session

    # -- messaging ----------------------------------------------------------------------------

    def join(self, session: Session, room_filter: str, msg_id: str | None) -> None:
        if self.rooms.join(session, room_filter):
            self._presence(session, room_filter, "join")
        self._ack(session, msg_id)

    def leave(self, session: Session, room_filter: str, msg_id: str | None) -> bool:
        """False when the session was not a member (the caller answers not_member)."""
        if msg_id is not None and session.recent.seen(msg_id):
            self._ack(session, msg_id)  # a resend whose first ack was lost in a cut
            return True
        if not self.rooms.leave(session, room_filter):
            if msg_id is not None:
                session.recent.forget(msg_id)
            return False
        self._presence(session, room_filter, "leave")
        self._ack(session, msg_id)
        return True

    def who(self, room_filter: str, ref: str | None) -> bytes:
        names = sorted({member.name for member in self.rooms.members(room_filter)})
        return encode_frame_of(Members(room=room_filter, names=names, ref=ref))

    def publish(self, session: Session, msg: Publish, ts: float) -> None:
        if msg.id is not None and session.recent.seen(msg.id):
            self._ack(session, msg.id)
            return
        members = self.rooms.match(msg.room)
        if members and (len(members) > 1 or members[0] is not session):
            message = Delivery(
                room=msg.room,
                sender=session.name,
                body=msg.body,
                id=msg.id,
                reply_to=msg.reply_to,
                ts=ts,
                seq=0,
            )
            prefix = message_prefix(encode(message))
            deliver = self.deliver
            for member in members:
                if member is not session:
                    deliver(member, prefix)
        self._ack(session, msg.id)

    def direct(self, session: Session, msg: Direct, ts: float) -> bool:
        """False when nobody has that name (the caller answers no_such_user)."""
        if msg.id is not None and session.recent.seen(msg.id):
            self._ack(session, msg.id)
            return True
        target = self.by_name.get(msg.to)
        if target is None:
            if msg.id is not None:
                # Forget the id so a retry after the user arrives is not taken for a resend.
                session.recent.forget(msg.id)
            return False
        message = Delivery(
            sender=session.name, to=msg.to, body=msg.body, id=msg.id, re=msg.re, ts=ts, seq=0
        )
        self.deliver(target, message_prefix(encode(message)))
        self._ack(session, msg.id)
        return True

    def deliver(self, session: Session, prefix: bytes) -> None:
        log = session.log
        if log.full:
            self.overflow(session)
            return
        seq = log.append(prefix)
        self.messages_routed += 1
        link = session.link
        if link is not None:
            link.queue(splice_frame(prefix, seq))

    def overflow(self, session: Session) -> None:
        """Past max_pending the session ends: a later resume learns of the gap."""
        logger.warning(
            "session_overflowed",
            session=session.id,
            name=session.name,
            pending=len(session.log),
            max_pending=session.log.max_pending,
        )
        link = session.link
        session.link = None
        self.end(session, reason="overflowed")
        if link is not None:
            link.close_with(
                ErrorCode.SLOW_CONSUMER,
                f"more than {session.log.max_pending} messages unacknowledged",
            )

    def _ack(self, session: Session, msg_id: str | None) -> None:
        if msg_id is not None and session.link is not None:
            session.link.ack(msg_id)

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

    def sessions(self) -> list[Session]:
        return list(self.by_token.values())
