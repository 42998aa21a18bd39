"""A cluster node's router: every publish and direct goes through the cluster's stream once,
and what the node's ordered consumer reads back is delivered to its own sessions.

- ``publish``/``direct`` publish the message once to the stream and answer
  :data:`ACK_LATER`: the client's ack waits until the node reads the message back (by its
  Nats-Msg-Id: it is stored), or for JetStream's answer to a possible resend. The node
  delivers to its own sessions what its consumer reads back, in stream order, so that a
  session's numbering is a function of the stream (:mod:`securemsg.core.cluster`);
- presence and ``who`` travel on core NATS subjects;
- losing NATS sends every client away (``bye`` ``node_unavailable``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, cast

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from securemsg.core.cluster import (
    MSG_ID_HEADER,
    PresenceNote,
    WhoAnswer,
    direct_subject,
    message_id,
    node_token,
    parse_subject,
    room_subject,
)
from securemsg.core.delivery import message_prefix
from securemsg.core.messages import (
    Delivery,
    Direct,
    ErrorCode,
    Presence,
    Publish,
    encode,
    encode_frame_of,
)
from securemsg.core.rooms import is_wildcard
from securemsg.core.server_session import ACK_LATER
from securemsg.server.broker import Session
from securemsg.server.cluster.flow import ClusterFlow
from securemsg.server.cluster.registry import ClusterLink, Pending, SessionState

__all__ = ["ClusterRouter"]

logger = structlog.get_logger("securemsg.server.cluster")


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish (the fields used)."""

    seq: int = 0
    error: dict[str, Any] | None = None


#: The stream reader lets the event loop run every this many messages.
_YIELD_EVERY = 64

_pubacks = msgspec.json.Decoder(_PubAck)
_notes = msgspec.json.Decoder(PresenceNote)
_answers = msgspec.json.Decoder(WhoAnswer)
_json = msgspec.json.encode


class ClusterRouter(ClusterFlow):
    """The message paths of a cluster node; :class:`~securemsg.server.cluster.broker.
    ClusterBroker` adds how sessions open."""

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, *, node: str, address: str) -> None:
        """Join the cluster as ``node``, reached by clients at ``address``."""
        self._loop = asyncio.get_running_loop()
        self.settings = replace(self.settings, node=node, address=address)
        self.node = node
        self.link.settings = self.settings
        await self.link.connect()
        nc = self.link.nc
        assert nc is not None
        token = node_token(self.node)
        self._ack_inbox = nc.new_inbox() + "."
        await nc.subscribe(self._ack_inbox + "*", cb=self._on_puback)
        await nc.subscribe("sm.presence", cb=self._on_presence)
        await nc.subscribe("sm.who", cb=self._on_who)
        await nc.subscribe(f"sm.node.{token}.release", cb=self._on_release)
        await nc.subscribe(f"sm.node.{token}.end", cb=self._on_end)
        await self.start_flow()
        _, self.position = await self.link.last_seq()
        self._follower = await self.link.follow(self.position, self._on_stream, self._pause_reading)
        await self._beat()
        assert self.link.nodes is not None and self.link.names is not None
        await self.watch(self.link.nodes, self._heard)
        await self.watch(self.link.names, self._named)
        self.spawn(self._every(self.settings.beat_interval, self._beat))
        self.spawn(self._every(self.settings.checkpoint_interval, self._sweep))
        self.spawn(self._every(self.settings.node_timeout, self.orphans.sweep))
        self.available = True
        self.event("cluster_connected", node=self.node, position=self.position)

    async def stop(self) -> None:
        """Write what the records lack (bounded), then leave NATS."""
        pending = [
            self._save(session, state) for session, state in self.states.items() if state.holds == 0
        ]
        if pending and self.available:
            await asyncio.wait(pending, timeout=self.settings.request_timeout)
        self.available = False
        await self._tasks.cancel_all()
        await self.link.close()

    def _lost(self) -> None:
        """NATS is gone: a split view is worse than none. Every client is told to move (its
        session resumes on another node from its record) and hellos are refused."""
        if not self.available:
            return
        self.available = False
        self.event("cluster_lost", warning=True, node=self.node, sessions=len(self.states))
        self._on_lost()
        for session in list(self.states):
            self.drop(session)
        self._pending.clear()
        self._acks.clear()

    async def _back(self) -> None:
        # A restarted nats-server forgot our consumer: follow again from where we were.
        if self._follower is not None:
            try:
                await self._follower.unsubscribe()
            except (NatsError, TimeoutError) as exc:
                logger.debug("cluster_request_failed", request="unfollow", error=repr(exc))
        try:
            self._follower = await self.link.follow(
                self.position, self._on_stream, self._pause_reading
            )
            await self._beat()
        except (NatsError, TimeoutError) as exc:
            self.event("cluster_resume_failed", warning=True, error=repr(exc))
            return
        self.available = True
        self.event("cluster_connected", node=self.node, position=self.position, again=True)

    # -- acks and checkpoints -----------------------------------------------------------

    async def _sweep(self) -> None:
        """Resend what JetStream did not acknowledge, give up on what it never did; move the
        checkpoints of sessions whose clients acknowledged, and refresh idle records."""
        now = self.loop.time()
        settings = self.settings
        for msg_id, pending in list(self._pending.items()):
            if now - pending.sent_at < settings.ack_timeout:
                continue
            session = pending.session
            if pending.attempts >= settings.ack_attempts or session not in self.states:
                del self._pending[msg_id]
                self._give_up(pending)
                continue
            pending.attempts += 1
            pending.sent_at = now
            self.resends += 1
            # JetStream may have stored it (and this node read it) already: then only its
            # answer says so, the copy is dropped and never read back.
            self._publish_confirmed(pending)
        if self._acks:  # answers that never came
            self._acks = {t: m for t, m in self._acks.items() if m in self._pending}
        for session, state in list(self.states.items()):
            if state.holds:
                continue
            delivery = session.delivery
            moved = state.checkpoints.acked(delivery.acked)
            if not len(delivery) and state.checkpoints.stream_seq < self.position:
                # Nothing unacknowledged: every message of the session up to here is behind
                # the client, so the checkpoint may move to here (less to read on a move).
                state.checkpoints.stream_seq = self.position
                state.checkpoints.seq = delivery.last_seq
            # Records expire with the bucket's max_age: a quiet session's is written again.
            moved = moved or now - state.written_at > settings.max_age / 4
            if moved and not state.saving:
                self._save(session, state)

    def _give_up(self, pending: Pending) -> None:
        """JetStream never acknowledged a message: the client's connection closes with
        ``server_busy``, and its resend (to this node or another) is carried out again,
        not taken for a duplicate (JetStream stores it once whatever happens)."""
        session = pending.session
        session.recent.forget(pending.request_id)
        link = session.link
        if link is not None:
            self.event(
                "cluster_unacknowledged", warning=True, name=session.name, attempts=pending.attempts
            )
            link.close_with(
                ErrorCode.SERVER_BUSY, "the cluster did not store a message in time: resend it"
            )

    # -- requests -------------------------------------------------------------------------

    def publish_datagram(self, prefix: bytes, room: str) -> tuple[int, int]:
        """In a cluster a session's numbers follow the stream (core/cluster.py): a message
        numbered outside it would make a moved session's numbers unrecoverable. So a
        datagram publish reaches this node's datagram members only (the listener's part),
        and every TLS member misses it, counted; nothing crosses to other nodes."""
        self.messages_received += 1
        return 0, len(self.rooms.match(room))

    # The Router's publish may answer ACK_LATER; the single server's never does.
    def publish(self, session: Session, msg: Publish, ts: float) -> int | None:  # type: ignore[override]
        self.messages_received += 1
        message = Delivery.of_publish(msg, sender=session.name, ts=ts)
        prefix = message_prefix(encode(message))
        if self.elsewhere.by_key:  # a session of another node is congested
            self.hold_for_remote(session, "r", msg.room)
        return self._send(session, room_subject(session.name, msg.room), prefix, msg.id)

    def direct(self, session: Session, msg: Direct, ts: float) -> int:
        if msg.to not in self.by_name and msg.to not in self.names:
            return False
        self.messages_received += 1
        message = Delivery.of_direct(msg, sender=session.name, ts=ts)
        prefix = message_prefix(encode(message))
        if self.elsewhere.by_key:
            self.hold_for_remote(session, "d", msg.to)
        return self._send(session, direct_subject(msg.to, session.name), prefix, msg.id) or True

    def _send(
        self, session: Session, subject: str, payload: bytes, request_id: str | None
    ) -> int | None:
        state = self.states.get(session)
        if request_id is None or state is None:
            self.link.publish(subject, payload, headers=None)
            return None
        msg_id = message_id(state.key, request_id)
        now = self.loop.time()
        pending = Pending(session, request_id, subject, payload, msg_id, now)
        self._pending[msg_id] = pending
        if now < state.resends_until:
            self._publish_confirmed(pending)
        else:
            # No reply inbox: the message is known stored when this node reads it back (by
            # its Nats-Msg-Id, in _on_stream), which saves JetStream's answer to every
            # publish. A copy JetStream drops as a duplicate is never read back: the sweep
            # then asks again, with a reply (and a client resending after a resume is asked
            # with one at once: resends_until).
            self.link.publish(subject, payload, headers={MSG_ID_HEADER: msg_id})
        return ACK_LATER

    def _publish_confirmed(self, pending: Pending) -> None:
        """Publish asking for JetStream's answer, which says where it is stored (the first
        copy's place for a duplicate) or that it is not."""
        token = str(next(self._tokens))
        self._acks[token] = pending.msg_id
        reply = self._ack_inbox + token
        self.link.publish(
            pending.subject, pending.payload, reply=reply, headers={MSG_ID_HEADER: pending.msg_id}
        )

    async def _on_puback(self, msg: Msg) -> None:
        msg_id = self._acks.pop(msg.subject[len(self._ack_inbox) :], None)
        pending = self._pending.get(msg_id) if msg_id is not None else None
        if pending is None:
            return
        try:
            answer = _pubacks.decode(msg.data)
        except msgspec.DecodeError:
            answer = _PubAck()
        if answer.error is not None or not answer.seq:  # not stored: the sweep resends it
            pending.sent_at = 0.0
            return
        if answer.seq <= self.position:
            del self._pending[pending.msg_id]
            self._stored(pending)
        # Else it is acknowledged once this node reads it back (delivers it here, in
        # _on_stream): a publisher then runs at most its outbox ahead of this node's
        # deliveries, so flow control holds it back in time.

    def _stored(self, pending: Pending) -> None:
        session = pending.session
        link = session.link
        if link is not None and session in self.states:
            session.hold_ack(pending.request_id, self.loop.time())
            cast(ClusterLink, link).acks_held()

    # The Router's join may answer ACK_LATER; the single server's never does.
    def join(  # type: ignore[override]
        self, session: Session, room_filter: str, *, ref: str | None = None
    ) -> int | None:
        """Acknowledged once the session's record holds the new filter: a join the client
        was told of survives the loss of this node."""
        if not self.rooms.join(session, room_filter):
            return None
        self._presence(session, room_filter, "join")
        state = self.states.get(session)
        if state is None:
            return None
        state.record.joined(room_filter, self.position)
        return self._ack_when_recorded(session, state, ref)

    def leave(  # type: ignore[override]
        self, session: Session, room_filter: str, *, ref: str | None = None
    ) -> int:
        """Acknowledged once the session's record no longer holds the filter, as a join."""
        if not self.rooms.leave(session, room_filter):
            return False
        self._presence(session, room_filter, "leave")
        state = self.states.get(session)
        if state is None:
            return True
        state.record.left(room_filter, self.position)
        return self._ack_when_recorded(session, state, ref) or True

    def _ack_when_recorded(
        self, session: Session, state: SessionState, ref: str | None
    ) -> int | None:
        """Write the changed membership; ACK_LATER: ``ref`` is acknowledged once written. Its
        id goes into the record, so a resend after a move is known there as a duplicate."""
        if ref is not None:
            state.record.requested(ref)
        recorded = self._changed(session)
        if recorded is None or ref is None:
            return None
        recorded.add_done_callback(lambda _: self._recorded(session, ref))
        return ACK_LATER

    def _recorded(self, session: Session, ref: str) -> None:
        link = session.link
        if link is not None and session in self.states:
            session.hold_ack(ref, self.loop.time())
            cast(ClusterLink, link).acks_held()

    # -- the stream, read back ------------------------------------------------------------

    def _on_stream(
        self, sseq: int, subject: str, prefix: bytes, msg_id: str | None, unread: int
    ) -> bool:
        """One stream message, in stream order; ``unread`` is how many more the stream
        holds for this node's consumer. True asks the caller to yield to the loop before
        the next one, when it can (see the end)."""
        if sseq <= self.position:
            return False  # a consumer started again from before where we are
        self.position = sseq
        if self._position_waiters:
            self._reached(sseq)
        if msg_id is not None and self._pending:
            pending = self._pending.pop(msg_id, None)
            if pending is not None:
                self._stored(pending)
        kind, sender, target = parse_subject(subject)
        states = self.states
        # Stream messages this node has not read yet (any may be a member's): they count
        # toward its members' congestion, or a publisher on a node ahead of this one would be
        # held back too late (its acks follow its own node's reading, not this one's).
        follower = self._follower
        queued = follower.pending_msgs if follower is not None else 0
        behind = unread + queued
        # Fewer unacknowledged than this, a member is not pressed (DeliveryLog.press). Not by
        # a publisher of this node: its acks follow this node's reading already.
        floor = self.max_pending // 2 - behind
        press = behind if behind and sender not in self.by_name else 0
        if kind == "r":
            recipients: list[Session] = [
                member for member in self.rooms.match(target) if member.name != sender
            ]
        else:
            recipient = self.by_name.get(target)
            recipients = [] if recipient is None else [recipient]
        for member in recipients:
            state = states.get(member)
            if state is None:
                continue
            if state.held is not None:
                state.held.append((sseq, kind, sender, target, prefix))
            else:
                self._number(member, state, prefix, sseq)
                log = member.delivery
                if log.congested:
                    # Flow control, as on one server: the publisher (on this node or
                    # another) publishes no more until the session is relieved or cut.
                    self.congested_here(member, sender)
                elif press and log.last_seq - log.acked >= floor and log.press(press):
                    self.pressed[member] = None
                    self.congested_here(member, sender)
        if self.pressed and behind <= self.max_pending // 4:  # else none can be relieved
            self.caught_up(behind)
        if self.notes:  # the other nodes must hear of a congestion before we read on
            self._notes_due = True
            return True
        # nats-py hands a queued backlog over without yielding: the clients' acks (and
        # their writes) must go on meanwhile, or flow control sees sessions fill up with
        # what they could have taken. (A node that delivers nothing need not: yielding
        # more makes smaller NATS writes, which cost a publishing node ~20 % more CPU.)
        return bool(recipients and not sseq % _YIELD_EVERY and queued)

    async def _pause_reading(self) -> None:
        """What the stream reader awaits when :meth:`_on_stream` asks (nats-py's way)."""
        if self._notes_due:
            self._notes_due = False
            await self.notes_out()
        else:
            await asyncio.sleep(0)

    async def reach(self, position: int) -> None:
        """Return once this node's consumer has carried out ``position``."""
        if self.position >= position:
            return
        future: asyncio.Future[None] = self.loop.create_future()
        self._position_waiters.append((position, future))
        try:
            await future
        finally:
            if not future.done():
                future.cancel()
            self._position_waiters = [w for w in self._position_waiters if w[1] is not future]

    def _reached(self, position: int) -> None:
        for wanted, future in self._position_waiters:
            if wanted <= position and not future.done():
                future.set_result(None)

    # -- presence and who -----------------------------------------------------------------

    def _presence(self, session: Session, room_filter: str, event: str) -> None:
        super()._presence(session, room_filter, event)
        if self.available:
            note = PresenceNote(room_filter, session.name, event, self.node)
            self.link.publish("sm.presence", _json(note), headers=None)

    async def _on_presence(self, msg: Msg) -> None:
        note = _notes.decode(msg.data)
        if note.node == self.node:
            return
        if is_wildcard(note.room):
            audience = self.rooms.members(note.room)
        else:
            audience = self.rooms.match(note.room)
        frame = None
        for member in audience:
            if member.link is not None and member.name != note.name:
                if frame is None:
                    frame = encode_frame_of(
                        Presence(room=note.room, name=note.name, event=note.event)  # type: ignore[arg-type]
                    )
                member.link.queue(frame)

    def who(self, room_filter: str, ref: str | None, session: Session | None = None) -> bytes:
        names = {member.name for member in self.rooms.members(room_filter)}
        others = [node for node in self.live_nodes() if node != self.node]
        if session is None or not others or not self.available:
            return self.members_frame(room_filter, sorted(names), ref)
        self.spawn(self._gather(session, room_filter, ref, names, len(others)))
        return b""

    async def _gather(
        self, session: Session, room_filter: str, ref: str | None, names: set[str], expected: int
    ) -> None:
        """Ask every node for its members of ``room_filter``; answer when all live nodes
        did, or after who_timeout with what came."""
        nc = self.link.nc
        assert nc is not None
        inbox = nc.new_inbox()
        answered: set[str] = set()
        everyone = asyncio.Event()

        async def answer(msg: Msg) -> None:
            got = _answers.decode(msg.data)
            if got.node != self.node:
                answered.add(got.node)
                names.update(got.names)
                if len(answered) >= expected:
                    everyone.set()

        sub = await nc.subscribe(inbox, cb=answer)
        try:
            await nc.publish("sm.who", room_filter.encode(), reply=inbox)
            try:
                async with asyncio.timeout(self.settings.who_timeout):
                    await everyone.wait()
            except TimeoutError:
                pass
        finally:
            await sub.unsubscribe()
        if session.link is not None:
            session.link.queue(self.members_frame(room_filter, sorted(names), ref))

    async def _on_who(self, msg: Msg) -> None:
        room_filter = msg.data.decode()
        names = sorted({member.name for member in self.rooms.members(room_filter)})
        if msg.reply:
            await msg.respond(_json(WhoAnswer(self.node, names)))
