"""What a cluster node keeps of its sessions, of the names and of the other nodes.

- every session of the node has a :class:`SessionState`: its record (bucket
  ``sm_sessions``), the checkpoints, and its deliveries held (un-numbered, in stream order)
  while a membership change is being written or the session replayed: no number is given
  that the record in NATS could not explain;
- names are claimed in bucket ``sm_names`` and watched into :attr:`ClusterRegistry.names`;
- nodes say they live in bucket ``sm_nodes`` (:attr:`ClusterRegistry.heard`).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from securemsg.core.cluster import (
    Checkpoints,
    NameClaim,
    NodeBeat,
    PresenceNote,
    SessionRecord,
    WhoAnswer,
    live_nodes,
    name_key,
    node_token,
)
from securemsg.core.messages import (
    ErrorCode,
)
from securemsg.errors import ProtocolError
from securemsg.server.broker import Broker, Link, Opened, Session
from securemsg.server.cluster.link import ClusterSettings, NatsLink
from securemsg.server.cluster.orphans import Orphans
from securemsg.server.tasks import Tasks

__all__ = ["ClusterLink", "ClusterRegistry", "SessionState"]

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
    #: Until then (loop time) its publishes ask JetStream for an answer: its client has just
    #: resumed and resends what it kept, which JetStream may have stored already.
    resends_until: float = 0.0


@dataclass(slots=True)
class Pending:
    """A publish JetStream has not acknowledged yet."""

    session: Session
    request_id: str
    subject: str
    payload: bytes
    msg_id: str
    sent_at: float
    attempts: int = 1


class ClusterRegistry(Broker):
    """A cluster node's sessions, names and nodes (see the module doc)."""

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        on_lost: Callable[[], None],
        on_drop: Callable[[Session], None],
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.opens_later = True
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
        self.orphans = Orphans(self)
        #: Nodes heard from: when (loop time) and their client address.
        self.heard: dict[str, tuple[float, str]] = {}
        #: This process's incarnation, and each node's as last heard (NodeBeat.boot).
        self.boot = secrets.token_hex(8)
        self.boots: dict[str, str] = {}
        #: How many times a node was heard with a new incarnation (it restarted).
        self.restarts = 0
        self.available = False
        #: Publishes not known to be stored yet, by Nats-Msg-Id.
        self._pending: dict[str, Pending] = {}
        #: The Nats-Msg-Id of each publish sent with a reply inbox, by the inbox's last token.
        self._acks: dict[str, str] = {}
        self._tokens = itertools.count(1)
        self._ack_inbox = ""
        self._tasks = Tasks()
        self._follower: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: What happened, by log event name (the metrics' securemsg_cluster_events_total).
        self.events: Counter[str] = Counter()
        #: Publishes sent again to JetStream (no answer within ack_timeout).
        self.resends = 0
        #: Moves waiting for the consumer to reach a position.
        self._position_waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _lost(self) -> None:
        """NATS is gone (the router sends every client away)."""

    async def _back(self) -> None:
        """NATS is back (the router follows the stream again)."""

    @property
    def publishes_pending(self) -> int:
        """Publishes not known to be stored yet."""
        return len(self._pending)

    def event(self, event: str, *, warning: bool = False, **fields: Any) -> None:
        """Log ``event`` and count it."""
        self.events[event] += 1
        (logger.warning if warning else logger.info)(event, **fields)

    # -- tasks ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    async def _every(
        self, interval: float, action: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.available:
                try:
                    await action()
                except (NatsError, TimeoutError) as exc:
                    logger.debug("cluster_request_failed", request=action.__name__, error=repr(exc))

    # -- nodes ----------------------------------------------------------------------------

    async def _beat(self) -> None:
        assert self.link.nodes is not None
        beat = NodeBeat(node=self.node, address=self.settings.address, boot=self.boot)
        await self.link.nodes.put(node_token(self.node), _json(beat))
        self.heard[self.node] = (self.loop.time(), self.settings.address)
        self.boots[self.node] = self.boot

    async def watch(self, kv: KeyValue, apply: Callable[[KeyValue.Entry], None]) -> None:
        """Apply what ``kv`` holds now (before returning), then every change (in a task)."""
        watcher = await kv.watchall()
        timeout = self.settings.request_timeout
        async with asyncio.timeout(timeout):
            while (entry := await watcher.updates(timeout)) is not None:  # type: ignore[no-untyped-call]
                apply(entry)
        self.spawn(self._follow(watcher, apply))

    @staticmethod
    async def _follow(
        watcher: KeyValue.KeyWatcher, apply: Callable[[KeyValue.Entry], None]
    ) -> None:
        async for entry in watcher:
            if entry is not None:
                apply(entry)

    def _heard(self, entry: KeyValue.Entry) -> None:
        if entry.value is not None and entry.operation is None:
            beat = _beats.decode(entry.value)
            self.heard[beat.node] = (self.loop.time(), beat.address)
            before = self.boots.get(beat.node)
            if before is not None and before != beat.boot:
                self.restarts += 1
            self.boots[beat.node] = beat.boot

    def live_nodes(self) -> list[str]:
        heard = {node: at for node, (at, _) in self.heard.items()}
        return live_nodes(heard, now=self.loop.time(), timeout=self.settings.node_timeout)

    def nodes(self) -> list[str] | None:
        return sorted({self.heard[node][1] for node in self.live_nodes()}) or None

    def is_live(self, node: str) -> bool:
        heard = self.heard.get(node)
        return heard is not None and self.loop.time() - heard[0] <= self.settings.node_timeout

    def is_current(self, node: str, boot: str) -> bool:
        """Is ``node`` alive in the incarnation ``boot`` (not dead, nor restarted since)?"""
        return self.is_live(node) and self.boots.get(node, "") == boot

    # -- names ----------------------------------------------------------------------------

    def _named(self, entry: KeyValue.Entry) -> None:
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
        nk, value = name_key(name), _json(NameClaim(node=self.node, session=key, boot=self.boot))
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
            in_use = held.connected and self.is_current(held.node, held.boot)
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
        elif self.is_current(held.node, held.boot):
            self.link.publish(
                f"sm.node.{node_token(held.node)}.end", held.session.encode(), headers=None
            )
        else:  # a dead node's session (or one of an incarnation before): it ends here
            self.spawn(self.orphans.expire(held.session, reason="taken_over"))

    def set_connected(self, session: Session, connected: bool) -> None:
        state = self.states.get(session)
        if state is not None and self.available:
            claim = NameClaim(
                node=self.node, session=state.key, connected=connected, boot=self.boot
            )
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
        await self.free_name(key, name)

    async def free_name(self, key: str, name: str) -> None:
        """Free ``name`` if the session ``key`` still holds it."""
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
            logger.debug("cluster_request_failed", request="delete_record", error=repr(exc))

    # -- sessions -------------------------------------------------------------------------

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
            state.resends_until = now + self.settings.ack_timeout
            self._save(session, state)
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
            # What JetStream has not acknowledged yet is not acknowledged to the client: its
            # resend must be published again (JetStream keeps one copy), not taken for a
            # duplicate and acknowledged before it is stored.
            for pending in self._pending.values():
                if pending.session is session:
                    session.recent.forget(pending.request_id)

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
            self.event("session_moved_away", session=session.id, name=session.name, asked=True)
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
                    self.event(
                        "session_moved_away", session=session.id, name=session.name, asked=False
                    )
                    self.drop(session, closing="the session resumed on another node")
                    break
                except (NatsError, TimeoutError) as exc:
                    self.event(
                        "session_record_failed", warning=True, name=session.name, error=repr(exc)
                    )
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

    def _changed(self, session: Session) -> asyncio.Future[None] | None:
        """A membership changed: hold the session's deliveries until the record says so
        (the future it returns: done once written, or given up)."""
        state = self.states.get(session)
        if state is None or not self.available:
            return None
        if state.held is None:
            state.held = []
        state.holds += 1
        saved = self._save(session, state)
        saved.add_done_callback(lambda _: self.release(session, state))
        return saved

    def _number(self, session: Session, state: SessionState, prefix: bytes, sseq: int) -> None:
        seq = self.deliver(session, prefix)
        if seq:
            state.checkpoints.numbered(seq, sseq)
