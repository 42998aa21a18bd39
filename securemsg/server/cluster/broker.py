"""A cluster node's router: the :class:`~securemsg.server.broker.Broker` of its own sessions,
with every publish and direct going through the cluster's stream.

What changes against one server (see docs/cluster.md):

- ``publish``/``direct`` publish the message once to the stream and answer
  :data:`ACK_LATER`: the client's ack waits for JetStream's (the message is stored). The
  node delivers to its own sessions what its ordered consumer reads back, in stream order,
  so that a session's numbering is a function of the stream (:mod:`securemsg.core.cluster`);
- membership changes are written to the session's record, and the session's deliveries wait
  (un-numbered, in order) while such a write is on its way: no number is given that a
  record in NATS could not explain;
- presence and ``who`` travel on core NATS subjects; names are claimed in a bucket;
- sessions open asynchronously (:meth:`open_later`): a name is claimed, or a session owned by
  another node is moved here (:mod:`securemsg.server.cluster.moves`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from securemsg.core.cluster import (
    Checkpoints,
    NameClaim,
    NodeBeat,
    PresenceNote,
    SessionRecord,
    WhoAnswer,
    direct_subject,
    live_nodes,
    message_id,
    name_key,
    node_token,
    parse_subject,
    room_subject,
)
from securemsg.core.delivery import message_prefix
from securemsg.core.messages import (
    Delivery,
    Direct,
    ErrorCode,
    Hello,
    Presence,
    Publish,
    encode,
    encode_frame_of,
)
from securemsg.core.rooms import is_wildcard
from securemsg.core.server_session import ACK_LATER
from securemsg.errors import ProtocolError
from securemsg.server.broker import Broker, Link, Opened, Session
from securemsg.server.cluster.link import ClusterSettings, NatsLink

__all__ = ["ClusterBroker", "ClusterLink", "SessionState"]

logger = structlog.get_logger("securemsg.server.cluster")

_records = msgspec.json.Decoder(SessionRecord)
_claims = msgspec.json.Decoder(NameClaim)
_beats = msgspec.json.Decoder(NodeBeat)
_notes = msgspec.json.Decoder(PresenceNote)
_answers = msgspec.json.Decoder(WhoAnswer)
_json = msgspec.json.encode


class ClusterLink(Link, Protocol):
    def acks_held(self) -> None:
        """An ack was held from outside a read: flush in time."""


@dataclass(slots=True)
class SessionState:
    """What the node keeps of one of its sessions for the cluster."""

    key: str
    record: SessionRecord
    revision: int
    checkpoints: Checkpoints
    #: Deliveries waiting (in stream order) while the record is being written or the session
    #: replayed: (stream_seq, kind, name, room, prefix).
    held: list[tuple[int, str, str, str, bytes]] | None = None
    holds: int = 0
    #: Held messages at or below this stream position were replayed already.
    replayed_upto: int = 0
    version: int = 0
    written: int = 0
    saving: bool = False
    written_at: float = 0.0
    dropped: bool = False
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    """A publish JetStream has not acknowledged yet."""

    session: Session
    request_id: str
    subject: str
    payload: bytes
    msg_id: str
    sent_at: float
    attempts: int = 1


class ClusterBroker(Broker):
    opens_later = True

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        on_lost: Callable[[], None],
        on_drop: Callable[[Session], None],
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.settings = settings
        self.node = settings.node
        self.link = NatsLink(settings, on_lost=self._lost, on_back=self._back)
        self._on_lost, self._on_drop = on_lost, on_drop
        #: The last stream position this node's consumer carried out.
        self.position = 0
        self.states: dict[Session, SessionState] = {}
        self.by_key: dict[str, Session] = {}
        #: Every name held in the cluster (watched from the sm_names bucket).
        self.names: dict[str, NameClaim] = {}
        #: Nodes heard from: when (loop time) and their client address.
        self.heard: dict[str, tuple[float, str]] = {}
        self.available = False
        self._pending: dict[str, _Pending] = {}
        self._tokens = itertools.count(1)
        self._ack_inbox = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._follower: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Moves waiting for the consumer to reach a position.
        self._position_waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

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
        _, self.position = await self.link.last_seq()
        self._follower = await self.link.follow(self.position, self._on_stream)
        await self._beat()
        self.spawn(self._watch_nodes())
        self.spawn(self._watch_names())
        self.spawn(self._every(self.settings.beat_interval, self._beat))
        self.spawn(self._every(self.settings.checkpoint_interval, self._sweep))
        self.available = True
        logger.info("cluster_connected", node=self.node, position=self.position)

    async def stop(self) -> None:
        """Write what the records lack (bounded), then leave NATS."""
        pending = [
            self._save(session, state) for session, state in self.states.items() if state.holds == 0
        ]
        if pending and self.available:
            await asyncio.wait(pending, timeout=self.settings.request_timeout)
        self.available = False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.link.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)

    async def _every(
        self, interval: float, action: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.available:
                try:
                    await action()
                except (NatsError, TimeoutError) as exc:
                    logger.debug("cluster_chore_failed", error=repr(exc))

    def _lost(self) -> None:
        """NATS is gone: a split view is worse than none. Every client is told to move (its
        session resumes on another node from its record) and hellos are refused."""
        if not self.available:
            return
        self.available = False
        logger.warning("cluster_lost", node=self.node, sessions=len(self.states))
        self._on_lost()
        for session in list(self.states):
            self.drop(session)
        self._pending.clear()

    async def _back(self) -> None:
        # A restarted nats-server forgot our consumer: follow again from where we were.
        if self._follower is not None:
            try:
                await self._follower.unsubscribe()
            except (NatsError, TimeoutError) as exc:
                logger.debug("cluster_unfollow_failed", error=repr(exc))
        try:
            self._follower = await self.link.follow(self.position, self._on_stream)
            await self._beat()
        except (NatsError, TimeoutError) as exc:
            logger.warning("cluster_resume_failed", error=repr(exc))
            return
        self.available = True
        logger.info("cluster_connected", node=self.node, position=self.position, again=True)

    # -- nodes ----------------------------------------------------------------------------

    async def _beat(self) -> None:
        assert self.link.nodes is not None
        beat = NodeBeat(node=self.node, address=self.settings.address)
        await self.link.nodes.put(node_token(self.node), _json(beat))
        self.heard[self.node] = (self.loop.time(), self.settings.address)

    async def _watch_nodes(self) -> None:
        assert self.link.nodes is not None
        watcher = await self.link.nodes.watchall()
        async for entry in watcher:
            if entry is None or entry.value is None or entry.operation is not None:
                continue
            beat = _beats.decode(entry.value)
            self.heard[beat.node] = (self.loop.time(), beat.address)

    def live_nodes(self) -> list[str]:
        heard = {node: at for node, (at, _) in self.heard.items()}
        return live_nodes(heard, now=self.loop.time(), timeout=self.settings.node_timeout)

    def nodes(self) -> list[str] | None:
        return sorted({self.heard[node][1] for node in self.live_nodes()}) or None

    def is_live(self, node: str) -> bool:
        heard = self.heard.get(node)
        return heard is not None and self.loop.time() - heard[0] <= self.settings.node_timeout

    # -- names ----------------------------------------------------------------------------

    async def _watch_names(self) -> None:
        assert self.link.names is not None
        watcher = await self.link.names.watchall()
        async for entry in watcher:
            if entry is None:
                continue
            name = entry.key.replace("=", "@")
            if entry.operation is not None or entry.value is None:  # DEL or PURGE
                self.names.pop(name, None)
            else:
                self.names[name] = _claims.decode(entry.value)

    async def claim(self, name: str, key: str) -> None:
        """Hold ``name`` cluster-wide for the session ``key``, or raise ``name_taken``: a name
        held by a connected session on a live node is taken; one held by a disconnected
        session, or on a dead node, is taken over (that session ends, as on one server)."""
        kv = self.link.names
        assert kv is not None
        nk, value = name_key(name), _json(NameClaim(node=self.node, session=key))
        try:
            await kv.create(nk, value)
            return
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await kv.get(nk)
        except KeyNotFoundError:
            await kv.create(nk, value)  # freed meanwhile
            return
        assert entry.value is not None
        held = _claims.decode(entry.value)
        if held.node == self.node:
            holder = self.by_key.get(held.session)
            in_use = holder is not None and holder.link is not None
        else:
            in_use = held.connected and self.is_live(held.node)
        if in_use:
            raise ProtocolError(ErrorCode.NAME_TAKEN, f"the name {name!r} is in use")
        try:
            await kv.update(nk, value, last=entry.revision)
        except KeyWrongLastSequenceError:
            raise ProtocolError(ErrorCode.NAME_TAKEN, f"the name {name!r} is in use") from None
        self._end_elsewhere(held)

    def _end_elsewhere(self, held: NameClaim) -> None:
        """The session that held a name we took ends wherever it is."""
        holder = self.by_key.get(held.session)
        if holder is not None:
            self.end(holder, reason="taken_over")
        elif self.is_live(held.node):
            self.link.publish(
                f"sm.node.{node_token(held.node)}.end", held.session.encode(), headers=None
            )
        else:
            self.spawn(self._delete_record(held.session))

    def set_connected(self, session: Session, connected: bool) -> None:
        state = self.states.get(session)
        if state is not None and self.available:
            claim = NameClaim(node=self.node, session=state.key, connected=connected)
            self.spawn(self._put_claim(session.name, claim))

    async def _put_claim(self, name: str, claim: NameClaim) -> None:
        assert self.link.names is not None
        try:
            entry = await self.link.names.get(name_key(name))
        except KeyNotFoundError:
            return
        assert entry.value is not None
        if _claims.decode(entry.value).session == claim.session:
            try:
                await self.link.names.update(name_key(name), _json(claim), last=entry.revision)
            except KeyWrongLastSequenceError:
                pass  # taken meanwhile

    async def _forget(self, key: str, name: str) -> None:
        """A session ended: its record goes, and its name if it still holds it."""
        await self._delete_record(key)
        kv = self.link.names
        assert kv is not None
        try:
            entry = await kv.get(name_key(name))
        except KeyNotFoundError:
            return
        assert entry.value is not None
        if _claims.decode(entry.value).session == key:
            try:
                await kv.delete(name_key(name), last=entry.revision)
            except KeyWrongLastSequenceError:
                pass

    async def _delete_record(self, key: str) -> None:
        assert self.link.sessions is not None
        try:
            await self.link.sessions.delete(key)
        except (NatsError, TimeoutError) as exc:
            logger.debug("cluster_delete_failed", error=repr(exc))

    # -- sessions -------------------------------------------------------------------------

    async def open_later(
        self, hello: Hello, *, identity: str | None, link: Link, now: float
    ) -> Opened:
        from securemsg.server.cluster.moves import move_here, start_session

        if not self.available:
            raise ProtocolError(
                ErrorCode.SERVER_BUSY, "this node lost the cluster: connect to another node"
            )
        name = self.policy.admit(hello, identity=identity)
        last_seq = hello.last_seq or 0
        try:
            async with asyncio.timeout(3 * self.settings.request_timeout):
                if hello.session is not None:
                    local = self.by_token.get(hello.session)
                    if local is not None and local.name == name:
                        return self._resume(local, last_seq, link, self.loop.time())
                    moved = await move_here(self, hello.session, name, last_seq, link)
                    if moved is not None:
                        return moved
                return await start_session(self, name, link)
        except (NatsError, TimeoutError) as exc:
            raise ProtocolError(
                ErrorCode.SERVER_BUSY, "the cluster did not answer in time: try again"
            ) from exc

    def register(self, session: Session, state: SessionState) -> None:
        """Make ``session`` one of this node's, its deliveries held until :meth:`release`."""
        self.by_name[session.name] = session
        self.by_token[session.token] = session
        self.by_key[state.key] = session
        self.states[session] = state
        state.held = []
        state.holds += 1

    def release(self, session: Session, state: SessionState) -> None:
        """One reason to hold the session's deliveries is gone; the last one numbers them."""
        state.holds -= 1
        if state.holds or state.held is None:
            return
        held, state.held = state.held, None
        if state.dropped:
            return
        for sseq, _, _, _, prefix in held:
            if sseq > state.replayed_upto:
                self._number(session, state, prefix, sseq)

    def _resume(self, session: Session, last_seq: int, link: Link, now: float) -> Opened:
        opened = super()._resume(session, last_seq, link, now)
        state = self.states.get(session)
        if state is not None:
            state.record.detached_at = None
            self.set_connected(session, True)
        return opened

    def detach(self, session: Session, link: Link, now: float, *, wall: float = 0.0) -> None:
        state = self.states.get(session)
        if state is None:
            return  # dropped (moved, or NATS lost): nothing of it is kept here
        super().detach(session, link, now, wall=wall)
        if session.link is None:
            state.checkpoints.acked(session.delivery.acked)
            state.record.detached_at = wall or time.time()
            self._save(session, state)
            self.set_connected(session, False)

    def end(self, session: Session, *, reason: str) -> list[str]:
        filters = super().end(session, reason=reason)
        state = self.states.pop(session, None)
        if state is not None:
            state.dropped = True
            self.by_key.pop(state.key, None)
            if self.available:
                self.spawn(self._forget(state.key, session.name))
        return filters

    def drop(self, session: Session, *, closing: str | None = None) -> None:
        """Forget a session here without ending it: it moved, or NATS is lost (its record
        stays, and another node can resume it)."""
        state = self.states.pop(session, None)
        if state is not None:
            state.dropped = True
            self.by_key.pop(state.key, None)
        self._reconnected(session)
        if self.by_name.get(session.name) is session:
            del self.by_name[session.name]
        self.by_token.pop(session.token, None)
        self.rooms.leave_all(session)
        session.expires_at = None
        self._stop_waiting(session)
        self.relieved(session)
        self._on_drop(session)
        link, session.link = session.link, None
        if link is not None and closing is not None:
            link.close_with(ErrorCode.SESSION_TAKEN_OVER, closing)

    async def _on_release(self, msg: Msg) -> None:
        """Another node takes over one of our sessions (its client resumed there)."""
        session = self.by_key.get(msg.data.decode())
        if session is not None:
            logger.info("session_released", session=session.id, name=session.name)
            self.drop(session, closing="the session resumed on another node")
        await msg.respond(b"ok")

    async def _on_end(self, msg: Msg) -> None:
        session = self.by_key.get(msg.data.decode())
        if session is not None:
            link, session.link = session.link, None
            self.end(session, reason="taken_over")
            self._on_drop(session)
            if link is not None:
                link.close_with(ErrorCode.SESSION_TAKEN_OVER, "the name was taken on another node")

    # -- records --------------------------------------------------------------------------

    def _save(self, session: Session, state: SessionState) -> asyncio.Future[None]:
        """Write the record (with the checkpoint as it is): done when written, or given up."""
        state.version += 1
        done: asyncio.Future[None] = self.loop.create_future()
        state.waiters.append((state.version, done))
        if not state.saving:
            state.saving = True
            self.spawn(self._saver(session, state))
        return done

    async def _saver(self, session: Session, state: SessionState) -> None:
        kv = self.link.sessions
        assert kv is not None
        try:
            while state.written < state.version and not state.dropped and self.available:
                target = state.version
                record = state.record
                record.stream_seq = state.checkpoints.stream_seq
                record.seq = state.checkpoints.seq
                record.trim(record.stream_seq)
                try:
                    state.revision = await kv.update(state.key, _json(record), last=state.revision)
                except KeyWrongLastSequenceError:
                    logger.info("session_moved_away", session=session.id, name=session.name)
                    self.drop(session, closing="the session resumed on another node")
                    break
                except (NatsError, TimeoutError) as exc:
                    logger.warning("session_record_failed", name=session.name, error=repr(exc))
                    break
                state.written, state.written_at = target, self.loop.time()
                self._wake_waiters(state, target)
        finally:
            state.saving = False
            self._wake_waiters(state, state.version)  # given up or dropped: nobody waits forever

    @staticmethod
    def _wake_waiters(state: SessionState, upto: int) -> None:
        kept = []
        for version, future in state.waiters:
            if version <= upto:
                if not future.done():
                    future.set_result(None)
            else:
                kept.append((version, future))
        state.waiters = kept

    def _changed(self, session: Session) -> None:
        """A membership changed: hold the session's deliveries until the record says so."""
        state = self.states.get(session)
        if state is None or not self.available:
            return
        if state.held is None:
            state.held = []
        state.holds += 1
        self._save(session, state).add_done_callback(lambda _: self.release(session, state))

    async def _sweep(self) -> None:
        """Resend what JetStream did not acknowledge, refuse what it never did; move the
        checkpoints of sessions whose clients acknowledged, and refresh idle records."""
        now = self.loop.time()
        settings = self.settings
        for token, pending in list(self._pending.items()):
            if now - pending.sent_at < settings.ack_timeout:
                continue
            session = pending.session
            if pending.attempts >= settings.ack_attempts or session not in self.states:
                del self._pending[token]
                self._refuse(pending)
                continue
            pending.attempts += 1
            pending.sent_at = now
            self.link.publish(
                pending.subject,
                pending.payload,
                reply=self._ack_inbox + token,
                headers={"Nats-Msg-Id": pending.msg_id},
            )
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
                moved = moved or now - state.written_at > settings.session_ttl / 4
            if moved and not state.saving:
                self._save(session, state)

    def _refuse(self, pending: _Pending) -> None:
        session = pending.session
        error = session.refuse(
            pending.request_id,
            ErrorCode.SERVER_BUSY,
            "the cluster did not store the message: send it again",
        )
        if session.link is not None:
            session.link.queue(encode_frame_of(error))

    # -- requests -------------------------------------------------------------------------

    # The Router's publish may answer ACK_LATER; the single server's never does.
    def publish(self, session: Session, msg: Publish, ts: float) -> int | None:  # type: ignore[override]
        self.messages_received += 1
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
        return self._send(session, room_subject(session.name, msg.room), prefix, msg.id)

    def direct(self, session: Session, msg: Direct, ts: float) -> int:
        if msg.to not in self.by_name and msg.to not in self.names:
            return False
        self.messages_received += 1
        message = Delivery(
            sender=session.name, to=msg.to, body=msg.body, id=msg.id, re=msg.re, ts=ts, seq=0
        )
        prefix = message_prefix(encode(message))
        return self._send(session, direct_subject(msg.to), prefix, msg.id) or True

    def _send(
        self, session: Session, subject: str, payload: bytes, request_id: str | None
    ) -> int | None:
        state = self.states.get(session)
        if request_id is None or state is None:
            self.link.publish(subject, payload, headers=None)
            return None
        token = str(next(self._tokens))
        msg_id = message_id(state.key, request_id)
        now = self.loop.time()
        self._pending[token] = _Pending(session, request_id, subject, payload, msg_id, now)
        headers = {"Nats-Msg-Id": msg_id}
        self.link.publish(subject, payload, reply=self._ack_inbox + token, headers=headers)
        return ACK_LATER

    async def _on_puback(self, msg: Msg) -> None:
        pending = self._pending.pop(msg.subject[len(self._ack_inbox) :], None)
        if pending is None:
            return
        if b'"error"' in msg.data:  # not stored: the sweep sends it again
            pending.sent_at = 0.0
            self._pending[msg.subject[len(self._ack_inbox) :]] = pending
            return
        session = pending.session
        link = session.link
        if link is not None and session in self.states:
            session.hold_ack(pending.request_id, self.loop.time())
            cast(ClusterLink, link).acks_held()

    def join(self, session: Session, room_filter: str) -> None:
        if self.rooms.join(session, room_filter):
            self._presence(session, room_filter, "join")
            state = self.states.get(session)
            if state is not None:
                state.record.joined(room_filter, self.position)
                self._changed(session)

    def leave(self, session: Session, room_filter: str) -> bool:
        if not self.rooms.leave(session, room_filter):
            return False
        self._presence(session, room_filter, "leave")
        state = self.states.get(session)
        if state is not None:
            state.record.left(room_filter, self.position)
            self._changed(session)
        return True

    # -- the stream, read back ------------------------------------------------------------

    async def _on_stream(self, msg: Msg) -> None:
        sseq = msg.metadata.sequence.stream
        if sseq <= self.position:
            return  # a consumer started again from before where we are
        self.position = sseq
        if self._position_waiters:
            self._reached(sseq)
        kind, name, room = parse_subject(msg.subject)
        prefix = msg.data
        states = self.states
        if kind == "r":
            for member in self.rooms.match(room):
                if member.name != name:
                    state = states.get(member)
                    if state is not None:
                        if state.held is not None:
                            state.held.append((sseq, kind, name, room, prefix))
                        else:
                            self._number(member, state, prefix, sseq)
        else:
            target = self.by_name.get(name)
            state = states.get(target) if target is not None else None
            if target is not None and state is not None:
                if state.held is not None:
                    state.held.append((sseq, kind, name, room, prefix))
                else:
                    self._number(target, state, prefix, sseq)

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

    def _number(self, session: Session, state: SessionState, prefix: bytes, sseq: int) -> None:
        seq = self.deliver(session, prefix)
        if seq:
            state.checkpoints.numbered(seq, sseq)

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
