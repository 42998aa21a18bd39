"""The server's session rules, sans-I/O: who may open a session, and what a session's requests
do, what is acknowledged, what is refused and what is replayed.

Theory of operation
-------------------
A :class:`ServerSession` lives from an accepted ``hello`` until ``bye``, expiry, overflow or
another session taking its name; connections come and go under it. The driver attaches the
connection (its *link*, opaque here) when a ``hello`` opens or resumes the session and
detaches it when the connection is gone, at which point the session may be resumed until
``expires_at``.

Every request (``join``, ``leave``, ``publish``, ``direct``, ``who``) passes, in order:

1. deduplication by id, for every request kind: a client resends what it has no answer for
   after a cut, with the same ids, so an id seen before is answered again the way it was
   (acknowledged, ``who`` answered, or refused) and neither carried out twice nor charged;
2. the rate limit: a token bucket of ``rate`` tokens a second, refilled on attach (and a
   ``join`` past ``max_subscriptions`` is refused, as it would hold memory and matching work);
3. the router (the broker: rooms, names, presence), which carries it out;
4. the answer: an ``ack`` held back (see below), a ``members`` frame, or an ``error`` frame
   with ``ref``. A refused request is remembered by id: its resend gets the same refusal
   (see :meth:`ServerSession._refuse`); a retry is a new request with a new id.

Acks are held back: they go out with the next frame to the client, when :data:`ACK_BATCH`
are held, or at :attr:`ServerSession.ack_due_at`, the deadline the driver arms its timer at.

Messages to the session are numbered and kept in :attr:`ServerSession.delivery` until the
client acknowledges them cumulatively; a resume replays those after its ``last_seq``. Past
``max_pending`` unacknowledged the log takes no more (the overflow rule) and the session
must end: a later resume then starts afresh and the client learns of the gap.

Nothing here reads a clock, opens a socket or logs: the caller passes ``now`` and acts on
the returned events (:class:`RequestRefused`, :class:`Joined`, :class:`Left`,
:class:`Answered`, and :class:`~securemsg.core.connection.FrameRejected` for a bad ``ack``).
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from securemsg.core.connection import FrameRejected
from securemsg.core.delivery import DeliveryLog, RecentIds, splice_frame
from securemsg.core.messages import (
    ACK_BATCH,
    ACK_DELAY,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Ack,
    Direct,
    Error,
    ErrorCode,
    Hello,
    Join,
    Leave,
    Publish,
    ServerAck,
    Who,
    is_valid_name,
    shorten,
)
from securemsg.errors import ProtocolError

__all__ = [
    "ACK_LATER",
    "Answered",
    "HelloPolicy",
    "Joined",
    "Left",
    "Relieved",
    "Request",
    "RequestRefused",
    "Router",
    "ServerSession",
    "SessionEvent",
]

L = TypeVar("L")

#: Every request kind; each carries an optional id, and every one is deduplicated by it.
Request = Join | Leave | Publish | Direct | Who


#: What a router's ``publish``, ``direct`` or ``join`` returns when it will acknowledge the
#: request itself, later, with :meth:`ServerSession.hold_ack` (a cluster node: once the
#: request is stored): no ack is held now.
ACK_LATER: Final = 2

#: Refusals a session remembers, to answer a resend the same way (see ``_refuse``).
MAX_REFUSALS: Final = 1024


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """Answer the request with ``error`` (it was not carried out)."""

    error: Error


@dataclass(frozen=True, slots=True)
class Joined:
    room: str


@dataclass(frozen=True, slots=True)
class Left:
    room: str


@dataclass(frozen=True, slots=True)
class Answered:
    """Send ``frame``, the answer to a ``who``."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Relieved:
    """An ack brought a congested delivery log down to its low watermark: the publishers
    waiting on this session may go on (see :class:`~securemsg.core.delivery.DeliveryLog`)."""


RELIEVED = Relieved()

SessionEvent = RequestRefused | Joined | Left | Answered | Relieved | FrameRejected


class Router(Protocol[L]):
    """What carries requests out across sessions (the broker)."""

    def publish(self, session: ServerSession[L], msg: Publish, ts: float) -> int | None:
        """:data:`ACK_LATER` when the router acknowledges it later; else None."""

    def direct(self, session: ServerSession[L], msg: Direct, ts: float) -> int:
        """False when nobody has that name, :data:`ACK_LATER`, or True."""

    def join(
        self, session: ServerSession[L], room_filter: str, *, ref: str | None = None
    ) -> int | None:
        """Carry out the join whose id is ``ref``: :data:`ACK_LATER` when the router
        acknowledges it later itself (a cluster node, once the membership is recorded)."""

    def subscription_count(self, session: ServerSession[L]) -> int:
        """How many rooms and filters ``session`` has joined (cheap: every join asks)."""

    def subscriptions(self, session: ServerSession[L]) -> Collection[str]:
        """The rooms and filters ``session`` has joined (asked only at the limit)."""

    def leave(self, session: ServerSession[L], room_filter: str, *, ref: str | None = None) -> int:
        """Carry out the leave whose id is ``ref``: False (0) when the session was not a
        member, :data:`ACK_LATER` when the router acknowledges it later itself."""

    def who(
        self, room_filter: str, ref: str | None, session: ServerSession[L] | None = None
    ) -> bytes:
        """The ``members`` frame answering ``session``'s ``who``; empty when the router
        sends it later itself (a cluster node asks the others first)."""


@dataclass(frozen=True, slots=True)
class HelloPolicy:
    """Who may open a session: the protocol version, the shared token, and the name.

    A verified client certificate binds the name whenever one was presented (with ``--ca``
    the TLS layer verifies any certificate offered), not only under required mutual TLS:
    otherwise a client holding alice's certificate could register as bob. Every name, claimed
    or from a certificate, follows the one name rule (``NAME_PATTERN``): a certificate name
    such as ``Alice Smith <ops>``, or one holding a newline, is refused, not shown raw."""

    token: bytes | None = field(default=None, repr=False)
    require_identity: bool = False

    def admit(self, hello: Hello, *, identity: str | None) -> str:
        """The session's name, or :class:`ProtocolError` with the code to refuse with.

        ``identity`` is the name of the client's verified certificate, None when it
        presented none."""
        if hello.version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {hello.version} is not supported (this server speaks "
                f"{min(SUPPORTED_VERSIONS)} to {PROTOCOL_VERSION})",
            )
        if self.token is not None:
            offered = (hello.token or "").encode()
            if not hmac.compare_digest(offered, self.token):
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "the token is missing or wrong")
        if identity is not None:
            if not is_valid_name(identity):
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    f"the client certificate's name {shorten(identity)!r} is not a valid name "
                    "(names are 1 to 64 letters, digits, '_', '-', '.' or '@')",
                )
            if hello.name is not None and hello.name != identity:
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    f"the name {hello.name!r} differs from the certificate's {identity!r}",
                )
            return identity
        if self.require_identity:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "a client certificate is required")
        if hello.name is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'hello' needs a 'name'")
        return hello.name


class ServerSession(Generic[L]):
    """One client session on the server; ``L`` is the driver's connection type."""

    # Slots: a server holds thousands of sessions, mostly idle.
    __slots__ = (
        "_acks",
        "_burst",
        "_refusals",
        "_tokens",
        "_tokens_at",
        "ack_due_at",
        "acked_at",
        "delivery",
        "expires_at",
        "id",
        "link",
        "max_subscriptions",
        "name",
        "rate",
        "recent",
        "stalled_since",
        "token",
        "waiters",
        "waiting_on",
    )

    def __init__(
        self,
        *,
        sid: str,
        name: str,
        token: str,
        max_pending: int,
        dedup_window: int,
        max_pending_bytes: int = 1 << 62,
        rate: float = 0.0,
        max_subscriptions: int = 1 << 62,
    ) -> None:
        self.id = sid
        self.name = name
        self.token = token
        self.delivery = DeliveryLog(max_pending, max_pending_bytes)
        self.recent = RecentIds(dedup_window)
        self.link: L | None = None
        self.expires_at: float | None = None
        #: Requests a second (0: no limit).
        self.rate = rate
        #: Rooms and filters the session may hold: each costs memory and matching work.
        self.max_subscriptions = max_subscriptions
        # A bucket must hold at least one token, or a rate below 1/s would refuse everything.
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._tokens_at = 0.0
        self._acks: list[str] | None = None
        # Refused requests by id, answered again the same way when resent (made on first use).
        self._refusals: dict[str, Error] | None = None
        #: When the held acks must go out (None: none held); the driver's ack timer.
        self.ack_due_at: float | None = None
        #: When an ack last made progress (the slow-consumer rule reads it).
        self.acked_at = 0.0
        #: Flow control, kept by the router: the sessions whose publishes wait for this
        #: congested one, since when (set by the first check that sees them), and the
        #: congested sessions this one's publishes wait for.
        self.waiters: set[ServerSession[L]] | None = None
        self.stalled_since: float | None = None
        self.waiting_on: set[ServerSession[L]] | None = None

    def __repr__(self) -> str:  # never show the token
        return f"ServerSession({self.id}, {self.name!r}, connected={self.link is not None})"

    # -- connections ------------------------------------------------------------------------

    def attach(self, link: L, now: float) -> None:
        """``link`` carries the session from now on (a new session, or a resume)."""
        self.link = link
        self.expires_at = None
        self._acks = self.ack_due_at = None
        # Each connection starts with a full bucket, as it always has.
        self._tokens = self._burst
        self._tokens_at = now

    def detach(self, link: L, *, expires_at: float) -> bool:
        """``link`` is gone: keep the session until ``expires_at``. False when ``link`` was not
        the session's (it was taken over): nothing changes then."""
        if self.link is not link:
            return False
        self.link = None
        self.expires_at = expires_at
        # Held acks died with the connection: the client resends those requests, and
        # deduplication acknowledges them again.
        self._acks = self.ack_due_at = None
        return True

    def replay(self, last_seq: int) -> list[bytes]:
        """The frames after ``last_seq`` (what the client has), for a resume."""
        return [splice_frame(prefix, seq) for seq, prefix in self.delivery.replay(last_seq)]

    # -- requests ---------------------------------------------------------------------------

    def receive(
        self, message: Request | Ack, now: float, ts: float, router: Router[L]
    ) -> SessionEvent | None:
        """Apply the session's rules to one message; ``ts`` is the wall-clock time that
        deliveries carry. Returns what the driver must log or send besides held acks.

        Not keyword-only, unlike the house rule: the driver calls this for every message, and
        passing four keywords cost ~4 % of the server route in ``bench/micro.py``."""
        # type() is, not isinstance(): on msgspec Structs isinstance costs ~60 ns (their
        # metaclass), and this is the path of every message.
        if type(message) is Ack:
            delivery = self.delivery
            before = delivery.acked
            try:
                relieved = delivery.ack(message.seq)
            except ProtocolError as exc:
                return FrameRejected(exc, fatal=False)
            if delivery.acked != before:
                self.acked_at = now
            return RELIEVED if relieved else None
        msg_id = message.id  # type: ignore[union-attr]  # not an Ack: a Request
        if msg_id is not None and self.recent.seen(msg_id):
            # A resend (its answer was lost in a cut): answered again, the same way, neither
            # carried out again nor charged to the rate limit.
            refusals = self._refusals
            if refusals is not None and msg_id in refusals:
                return RequestRefused(refusals[msg_id])
            if type(message) is Who:
                return Answered(router.who(message.room, msg_id, self))
        elif self.rate and not self._take_token(now):
            text = "message rate limit exceeded; dropped"
            return self._refuse(msg_id, ErrorCode.RATE_LIMITED, text)
        elif type(message) is Publish:  # here, not in _carry_out: the one on the hot path
            if router.publish(self, message, ts) == ACK_LATER:
                return None
        else:
            return self._carry_out(message, now=now, ts=ts, router=router)  # type: ignore[arg-type]
        # Carried out, now or before: acknowledged (held back; hold_ack inlined for publish).
        if msg_id is not None:
            acks = self._acks
            if acks is None:
                self.hold_ack(msg_id, now)
            else:
                acks.append(msg_id)
        return None

    def _carry_out(
        self, message: Request, *, now: float, ts: float, router: Router[L]
    ) -> SessionEvent | None:
        msg_id = message.id
        if isinstance(message, Direct):
            done = router.direct(self, message, ts)
            if not done:
                return self._refuse(msg_id, ErrorCode.NO_SUCH_USER, f"no user named {message.to!r}")
            if done != ACK_LATER:
                self.hold_ack(msg_id, now)
            return None
        if isinstance(message, Join):
            limit = self.max_subscriptions
            if router.subscription_count(self) >= limit and message.room not in (
                router.subscriptions(self)
            ):
                text = f"a session may join at most {limit} rooms and filters; leave one first"
                return self._refuse(msg_id, ErrorCode.TOO_MANY_ROOMS, text)
            if router.join(self, message.room, ref=msg_id) != ACK_LATER:
                self.hold_ack(msg_id, now)
            return Joined(message.room)
        if isinstance(message, Leave):
            done = router.leave(self, message.room, ref=msg_id)
            if not done:
                text = f"not a member of {message.room!r}"
                return self._refuse(msg_id, ErrorCode.NOT_MEMBER, text)
            if done != ACK_LATER:
                self.hold_ack(msg_id, now)
            return Left(message.room)
        assert isinstance(message, Who)
        return Answered(router.who(message.room, msg_id, self))

    def _take_token(self, now: float) -> bool:
        tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    def _refuse(self, msg_id: str | None, code: str, text: str) -> RequestRefused:
        """Refuse the request ``msg_id``, and remember it: a resend after a cut (whose
        refusal was lost) gets the same answer, instead of being carried out later, after
        what the client sent since. A retry by the client is a new request with a new id."""
        error = Error(code=code, message=text, ref=msg_id)
        if msg_id is not None:
            refusals = self._refusals
            if refusals is None:
                refusals = self._refusals = {}
            elif len(refusals) >= MAX_REFUSALS:
                # Bounded: the oldest refusal is forgotten, and its id with it (a resend of
                # it, that old, would be carried out: the window of RecentIds is as wide).
                oldest = next(iter(refusals))
                del refusals[oldest]
                self.recent.forget(oldest)
            refusals[msg_id] = error
        return RequestRefused(error)

    # -- held acks --------------------------------------------------------------------------

    def hold_ack(self, msg_id: str | None, now: float) -> None:
        """The request ``msg_id`` was carried out: acknowledge it soon (see the module doc)."""
        if msg_id is None:
            return
        acks = self._acks
        if acks is None:
            self._acks = [msg_id]
            self.ack_due_at = now + ACK_DELAY
        else:
            acks.append(msg_id)

    def acks_to_send(self, link: L, *, sending: bool) -> ServerAck | None:
        """The held acks if they go now: other frames are ``sending`` to ``link`` (an ack
        rides with them: one read for the client instead of two), or a batch is full."""
        acks = self._acks
        if acks is None or not (sending or len(acks) >= ACK_BATCH):
            return None
        return self.take_acks(link)

    def take_acks(self, link: L) -> ServerAck | None:
        """Every held ack, now (they are due, or ``link`` is closing), for ``link``: the
        held acks belong to the attached link, or to the last one if none is attached (an
        overflowed or taken-over session's closing connection)."""
        acks = self._acks
        if acks is None or (self.link is not link and self.link is not None):
            return None
        self._acks = self.ack_due_at = None
        return ServerAck(ids=acks)
