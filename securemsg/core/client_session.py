"""The client's session rules, sans-I/O: what was sent and not yet answered, what was
received, and what each server message means for them.

Theory of operation
-------------------
One :class:`ClientSession` lives as long as the client, across connections. The driver (the
asyncio :class:`~securemsg.client.mailbox.Mailbox`) calls it and acts on what it returns:

- :meth:`ClientSession.submit` gives a request (``join``, ``leave``, ``who``, ``publish``,
  ``direct``) the next id and keeps its frame in the :class:`~securemsg.core.delivery.Outbox`
  until the server answers that id: with ``ack``, ``members``, or ``error`` with ``ref``. It
  returns the frame, for the driver to write when connected.
- :meth:`ClientSession.attach` is called on every ``welcome`` and returns what to write first:
  for a new (not resumed) session the ``join`` of every room, numbering starting over in the
  :class:`~securemsg.core.delivery.Inbox`; then every unanswered frame, same ids, same order.
  The joins come first so that a resent ``leave`` still comes after its room's ``join``.
- :meth:`ClientSession.events_received` takes the events of one read
  (:mod:`securemsg.core.connection`) and returns what they mean, in order: each new
  :class:`~securemsg.core.messages.Message` for the application (a replayed one is dropped
  by its ``seq``; a reply to one of our request tokens becomes :class:`ReplyReceived`),
  :class:`Acknowledged`, :class:`Answered` and :class:`Refused` for answers by id, and
  :class:`FlushCompleted`. What the session has no rule for (``presence``, ``bye``, an
  ``error`` without ``ref``, a pong, a rejected frame) is passed on as it came.
- :meth:`ClientSession.ack_due` says what to acknowledge: an ``ack`` means *delivered to
  the application*, so it is cumulative up to the oldest message the application has not
  taken yet (the driver, which holds the received messages, says which that is). A reply
  that answers a request, a dropped reply and a skipped undecodable message never wait for
  the application: they count as taken on arrival. ``hello`` resumes from what was
  acknowledged (:attr:`ClientSession.last_seq`), so the server keeps what the application
  has not taken until it has, across connections; the replay overlap is dropped by ``seq``.
- :meth:`ClientSession.flush` marks what a flush waits for: every request in the outbox
  now. Answers count it down; a refusal counts too (a resend would be refused again, so the
  request leaves the outbox) but is remembered, and :meth:`Flush.error` reports it.

A delivered message is its own event, not wrapped: the receive path runs per message and a
wrapper would cost an allocation each. Nothing here depends on time: the driver paces acks
(at most one per loop iteration) and owns every deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from securemsg.core.connection import (
    Event,
    FrameRejected,
    MessageReceived,
    PongReceived,
    UndecodableMessage,
)
from securemsg.core.delivery import Inbox, Outbox
from securemsg.core.frames import DEFAULT_MAX_FRAME, HEADER_SIZE, encode_frame
from securemsg.core.gatekeeper import DELIVERY_HEADROOM
from securemsg.core.messages import (
    Bye,
    CheckedPublish,
    Error,
    Join,
    Members,
    Message,
    Presence,
    ServerAck,
    encode,
    encode_frame_of,
)
from securemsg.errors import RejectedError

__all__ = [
    "Acknowledged",
    "Answered",
    "ClientSession",
    "Flush",
    "FlushCompleted",
    "Make",
    "Refused",
    "ReplyReceived",
    "SessionEvent",
]

#: Builds the message to send from the id the session gives it.
Make = Callable[[str], msgspec.Struct]

#: Refusal reasons kept per flush for its error text; more kinds than this are counted only.
_MAX_REASONS: Final = 8


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """The server carried out the requests with these ids (one event per ``ack`` frame)."""

    ids: list[str]


@dataclass(frozen=True, slots=True)
class Answered:
    """The ``who`` with id ``ref`` was answered with these member names."""

    ref: str
    names: list[str]


@dataclass(frozen=True, slots=True)
class Refused:
    """The server refused the request with id ``ref``; it left the outbox."""

    ref: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The first reply to the request that carried ``token`` as its ``reply_to``."""

    token: str
    message: Message


@dataclass(frozen=True, slots=True)
class FlushCompleted:
    """Every request ``flush`` waited for is answered; :meth:`Flush.error` says how."""

    flush: Flush


SessionEvent = (
    Message
    | ReplyReceived
    | Acknowledged
    | Answered
    | Refused
    | FlushCompleted
    | Presence
    | Bye
    | Error
    | PongReceived
    | FrameRejected
    | UndecodableMessage
)


class Flush:
    """One flush in progress: ``remaining`` requests with ids up to ``mark`` are unanswered;
    ``refused`` of the ``total`` it waits for were refused so far."""

    __slots__ = ("mark", "reasons", "refused", "refused_ids", "remaining", "total")

    def __init__(self, mark: int, total: int) -> None:
        self.mark = mark
        self.total = total
        self.remaining = total
        self.refused = 0
        #: The ids refused, in order: the caller may want to know which to publish again.
        self.refused_ids: list[str] = []
        #: code -> (how many, the server's first message for it); up to _MAX_REASONS codes.
        self.reasons: dict[str, tuple[int, str]] = {}

    def count(self, refusal: Refused | None) -> bool:
        """One request it waits for was answered (``refusal``: refused); True once the
        last one was."""
        if refusal is not None:
            self.refused += 1
            self.refused_ids.append(refusal.ref)
            reasons = self.reasons
            reason = reasons.get(refusal.code)
            if reason is not None:
                reasons[refusal.code] = (reason[0] + 1, reason[1])
            elif len(reasons) < _MAX_REASONS:
                reasons[refusal.code] = (1, refusal.message)
        self.remaining -= 1
        return self.remaining <= 0

    def error(self) -> RejectedError | None:
        """None when nothing was refused; otherwise the error ``flush()`` raises: the code of
        the most frequent refusal, how many of how many were refused, and their ids."""
        if not self.refused:
            return None
        ranked = sorted(self.reasons.items(), key=lambda item: -item[1][0])
        code, (_, first_message) = ranked[0]
        text = f"{self.refused} of {self.total} messages were refused"
        if len(ranked) == 1:
            text += f": {first_message}"
        else:
            text += ": " + ", ".join(f"{count} {each}" for each, (count, _) in ranked)
        return RejectedError(code, text, ids=tuple(self.refused_ids))


class ClientSession:
    """The rules of one client session across its connections (see the module docstring)."""

    __slots__ = (
        "_flushes",
        "_frame_limit",
        "_request_ids",
        "_requests",
        "inbox",
        "last_id",
        "outbox",
        "request_prefix",
    )

    def __init__(
        self, *, max_outbox: int, request_prefix: str, max_outbox_bytes: int = 1 << 62
    ) -> None:
        self.outbox = Outbox(max_outbox, max_outbox_bytes)
        self.inbox = Inbox()
        self._frame_limit = DEFAULT_MAX_FRAME + HEADER_SIZE - DELIVERY_HEADROOM
        #: The id the last :meth:`submit` gave.
        self.last_id = "0"
        #: Every request token starts with it: a ``re`` that does is a reply to us.
        self.request_prefix = request_prefix
        self._request_ids = 0
        self._requests: set[str] = set()
        self._flushes: list[Flush] = []

    @property
    def max_frame(self) -> int:
        """The largest frame body the server accepts (from its welcome)."""
        return self._frame_limit - HEADER_SIZE + DELIVERY_HEADROOM

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        # Whole frames are checked: one compare.
        self._frame_limit = value + HEADER_SIZE - DELIVERY_HEADROOM

    @property
    def last_seq(self) -> int:
        """The ``seq`` for ``hello`` when resuming: the highest acknowledged (taken by the
        application), so the server replays what was received and not yet taken. The
        overlap is dropped as a replay."""
        return self.inbox.acked

    def ack_due(self, untaken: int | None) -> int | None:
        """The ``seq`` to acknowledge now, or None: up to before ``untaken``, the ``seq`` of
        the oldest message received and not yet taken by the application, or everything
        received when there is none."""
        return self.inbox.ack_due(untaken)

    # -- sending ----------------------------------------------------------------------------

    def submit(self, make: Make) -> bytes:
        """Keep the request ``make(id)`` in the outbox and return its frame.

        Raises ValueError when it does not fit the server's ``max_frame`` less the
        :data:`~securemsg.core.gatekeeper.DELIVERY_HEADROOM` the server keeps for the fields it
        adds to a delivery: the server would refuse it, and the resend after reconnecting
        would be refused again.
        """
        outbox = self.outbox
        msg_id = outbox.new_id()
        frame = encode_frame_of(make(msg_id))
        if len(frame) > self._frame_limit:
            raise self._too_large(len(frame) - HEADER_SIZE)
        outbox.add(msg_id, frame)
        self.last_id = msg_id
        return frame

    def submit_publish(self, room: str, body: msgspec.Raw) -> bytes:
        """:meth:`submit` of a ``publish`` to a room its caller checked, returning the
        payload: the client's hot path, with no maker to call, and a payload that a batch
        takes whole (the outbox keeps the frame, for resending)."""
        outbox = self.outbox
        msg_id = outbox.new_id()
        payload = encode(CheckedPublish(room=room, body=body, id=msg_id))
        frame = encode_frame(payload)
        if len(frame) > self._frame_limit:
            raise self._too_large(len(payload))
        outbox.add(msg_id, frame)
        self.last_id = msg_id
        return payload

    def _too_large(self, size: int) -> ValueError:
        return ValueError(
            f"message of {size} bytes exceeds the server's max_frame of {self.max_frame} "
            f"bytes (less {DELIVERY_HEADROOM} bytes it keeps for the sender, time and "
            "sequence number)"
        )

    def attach(self, *, resumed: bool, rooms: Iterable[str]) -> list[bytes]:
        """A connection was welcomed: the frames to write on it before anything new."""
        resend = self.outbox.unacked()
        if resumed:
            return resend
        self.inbox.reset()
        joins = [self.submit(_join_of(room)) for room in rooms]
        return joins + resend

    def restore(self, *, last_seq: int, next_id: int, outbox: list[tuple[str, bytes]]) -> None:
        """Take the session up where another process left it (a session file): messages
        up to ``last_seq`` were dealt with, ``outbox`` is to be resent."""
        self.inbox.restore(last_seq)
        self.outbox.restore(next_id=next_id, entries=outbox)
        self.last_id = str(self.outbox.next_id)

    def request_token(self) -> str:
        """A fresh ``reply_to`` token; its first reply becomes :class:`ReplyReceived`."""
        self._request_ids += 1
        token = f"{self.request_prefix}{self._request_ids}"
        self._requests.add(token)
        return token

    def forget_request(self, token: str) -> None:
        """Nobody waits for ``token`` any more: a reply to it is dropped."""
        self._requests.discard(token)

    def flush(self) -> Flush | None:
        """What a flush asked now waits for; None when nothing is unanswered."""
        pending = len(self.outbox)
        if not pending:
            return None
        flush = Flush(int(self.last_id), pending)
        self._flushes.append(flush)
        return flush

    def forget_flush(self, flush: Flush) -> None:
        """Nobody waits for ``flush`` any more (it completed, or its wait ended)."""
        if flush in self._flushes:
            self._flushes.remove(flush)

    # -- receiving --------------------------------------------------------------------------

    def events_received(self, events: list[Event]) -> list[SessionEvent]:
        """What one read's events mean for the session, in order (see the module docstring)."""
        out: list[SessionEvent] = []
        append = out.append
        inbox = self.inbox
        accept = inbox.accept
        for event in events:
            if type(event) is not MessageReceived:
                if type(event) is UndecodableMessage:
                    # Acknowledged and reported, never again: not delivered on every resume.
                    if accept(event.seq):
                        append(event)
                    continue
                append(event)  # type: ignore[arg-type]  # the rest of Event
                continue
            message = event.message
            if type(message) is Message:
                seq = message.seq
                if seq > inbox.last_seq:  # inbox.accept(seq), inline: once per message
                    inbox.last_seq = seq
                    token = message.re
                    if token is None or not token.startswith(self.request_prefix):
                        append(message)
                    elif token in self._requests:
                        self._requests.discard(token)
                        append(ReplyReceived(token, message))
                    # else a late or second reply to one of our requests: never delivered
            elif type(message) is ServerAck:
                if self._flushes:
                    for ref in message.ids:
                        self._answered(ref, None, out)
                else:  # _answered without a flush to count: the ids leave the outbox
                    self.outbox.ack_all(message.ids)
                append(Acknowledged(message.ids))
            elif type(message) is Members:
                if message.ref is not None:
                    self._answered(message.ref, None, out)
                    append(Answered(message.ref, message.names))
            elif type(message) is Error and message.ref is not None:
                refusal = Refused(message.ref, message.code, message.message)
                self._answered(message.ref, refusal, out)
                append(refusal)
            else:
                append(message)  # type: ignore[arg-type]  # presence, bye, error without ref
        return out

    def abandon(self, msg_id: str) -> list[SessionEvent]:
        """The application stopped waiting for the answer to ``msg_id`` (its timeout ran
        out): it leaves the outbox and is not resent after a reconnect, where it could be
        carried out long after the caller was told it failed, or block later requests
        forever. A flush that waits for it counts it as refused (``timeout``)."""
        out: list[SessionEvent] = []
        refusal = Refused(msg_id, "timeout", "no answer before the caller's timeout")
        self._answered(msg_id, refusal, out)
        return out

    def _answered(self, ref: str, refusal: Refused | None, out: list[SessionEvent]) -> None:
        """The server answered the request with id ``ref``: it leaves the outbox."""
        if not self.outbox.ack(ref) or not self._flushes:
            return
        number = int(ref)
        completed = False
        for flush in self._flushes:
            if number <= flush.mark and flush.count(refusal):
                out.append(FlushCompleted(flush))
                completed = True
        if completed:
            self._flushes = [flush for flush in self._flushes if flush.remaining > 0]


def _join_of(room: str) -> Make:
    return lambda msg_id: Join(room=room, id=msg_id)
