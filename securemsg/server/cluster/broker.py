"""The broker of a cluster node: how sessions open on it. A new one (its name claimed
cluster-wide), or one that lived on another node and moves here (its client resumed here:
the record is taken over, the stream read again from the checkpoint, and what the client
lacks replayed).
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from securemsg.core.cluster import (
    Checkpoints,
    NameClaim,
    Renumbering,
    SessionRecord,
    node_token,
    session_key,
)
from securemsg.core.messages import ErrorCode, Hello
from securemsg.core.server_session import ServerSession
from securemsg.errors import ProtocolError
from securemsg.server.broker import Link, Opened, Session, session_token
from securemsg.server.cluster.registry import SessionState
from securemsg.server.cluster.router import ClusterRouter

__all__ = ["ClusterBroker"]

logger = structlog.get_logger("securemsg.server.cluster")

_records = msgspec.json.Decoder(SessionRecord)


class ClusterBroker(ClusterRouter):
    """A cluster node's broker: sessions open after the cluster was asked (a name claimed,
    or a session moved here from another node)."""

    async def open_later(
        self, hello: Hello, *, identity: str | None, link: Link, now: float
    ) -> Opened:
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
                    moved = await self._move_here(hello.session, name, last_seq, link)
                    if moved is not None:
                        return moved
                return await self._start_session(name, link)
        except (NatsError, TimeoutError) as exc:
            raise ProtocolError(
                ErrorCode.SERVER_BUSY, "the cluster did not answer in time: try again"
            ) from exc

    def _new_session(self, name: str, token: str) -> Session:
        return ServerSession[Link](
            sid=f"s{next(self._ids)}",
            name=name,
            token=token,
            max_pending=self.max_pending,
            max_pending_bytes=self.max_pending_bytes,
            dedup_window=self.dedup_window,
            rate=self.max_msgs_per_sec,
            max_subscriptions=self.max_subscriptions,
        )

    async def _start_session(self, name: str, link: Link) -> Opened:
        """A new session: the name claimed in the cluster, the record written, then welcome."""
        holder = self.by_name.get(name)
        if holder is not None and holder.link is not None:
            raise ProtocolError(ErrorCode.NAME_TAKEN, f"the name {name!r} is in use")
        if len(self.by_token) >= self.max_sessions and not self._evict_oldest("max_sessions"):
            raise ProtocolError(
                ErrorCode.SERVER_BUSY,
                f"the server holds {self.max_sessions} sessions (max_sessions), all connected",
            )
        token = session_token()
        key = session_key(token)
        await self.claim(name, key)
        holder = self.by_name.get(name)
        if holder is not None:  # disconnected here: taken over, as on one server
            self.end(holder, reason="taken_over")
        session = self._new_session(name, token)
        # Directs to the name count from here: the position when the session becomes ours.
        record = SessionRecord(
            name=name,
            owner=self.node,
            owner_boot=self.boot,
            start=self.position,
            stream_seq=self.position,
        )
        state = _state(key, record, 0)
        self.register(session, state)
        try:
            assert self.link.sessions is not None
            state.revision = await self.link.sessions.create(key, msgspec.json.encode(record))
            state.written_at = self.loop.time()
        except BaseException:
            self.drop(session)
            raise
        self.release(session, state)  # what came meanwhile goes out after welcome
        session.attach(link, self.loop.time())
        return Opened(session, resumed=False, replay=session.replay(0), took_over=False)

    async def _move_here(self, token: str, name: str, last_seq: int, link: Link) -> Opened | None:
        """Resume a session another node held; None when there is none to resume (unknown,
        another name, expired, or its messages aged out of the stream: a new session then)."""
        started = time.perf_counter()
        key = session_key(token)
        taken = await self._take_record(key, name)
        if taken is None:
            return None
        record, revision, owner = taken
        first, _ = await self.link.last_seq()
        opened = None
        if first <= record.stream_seq + 1:  # else what followed the checkpoint is gone: a gap
            await self._catch_up(record)
            session = self._new_session(name, token)
            state = _state(key, record, revision)
            state.written_at = self.loop.time()
            self.register(session, state)
            try:
                opened = await self._replay(session, state, last_seq, link)
            except BaseException:
                self.drop(session)
                raise
            if opened is None:
                self.drop(session)
        if opened is None:
            # Not resumable after all: the record goes, and the name waits for a new session.
            self.spawn(self._delete_record(key))
            claim = NameClaim(node=self.node, session=key, connected=False, boot=self.boot)
            await self._put_claim(name, claim)
            return None
        self.set_connected(opened.session, True)
        self.event(
            "session_moved",
            session=opened.session.id,
            name=name,
            from_node=owner,
            replayed=len(opened.replay),
            took=round(time.perf_counter() - started, 4),
        )
        return opened

    async def _take_record(self, key: str, name: str) -> tuple[SessionRecord, int, str] | None:
        """The session's record made ours (its revision, and who held it), or None when there
        is no such session for ``name`` or it expired."""
        kv = self.link.sessions
        assert kv is not None
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        assert entry.value is not None
        record = _records.decode(entry.value)
        if record.name != name:
            return None
        owner = record.owner
        if owner != self.node and self.is_current(owner, record.owner_boot):
            await self._ask_release(owner, key)
            entry = await kv.get(key)
            assert entry.value is not None
            record = _records.decode(entry.value)
        if record.detached_at is not None and time.time() - record.detached_at > self.session_ttl:
            self.spawn(self._delete_record(key))
            return None
        record.owner, record.owner_boot, record.detached_at = self.node, self.boot, None
        try:
            revision = await kv.update(key, msgspec.json.encode(record), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise ProtocolError(
                ErrorCode.SERVER_BUSY, "the session is moving between nodes: try again"
            ) from None
        return record, revision, owner

    async def _ask_release(self, owner: str, key: str) -> None:
        """The old owner is alive: it lets go of the session (closing its connection, if any)
        before we read the record, so no message is numbered on two nodes."""
        nc = self.link.nc
        assert nc is not None
        try:
            await nc.request(
                f"sm.node.{node_token(owner)}.release",
                key.encode(),
                timeout=self.settings.request_timeout / 2,
            )
        except (NoRespondersError, NatsTimeoutError):
            pass  # it died meanwhile: the record is all there is

    async def _catch_up(self, record: SessionRecord) -> None:
        """Wait until this node's consumer has read as far as the record refers to, so the
        filters it holds are in effect here for every message it routes from now on."""
        target = max(
            [record.start, record.stream_seq]
            + [span.end if span.end is not None else span.start for span in record.filters]
        )
        async with asyncio.timeout(self.settings.request_timeout):
            await self.reach(target)

    async def _replay(
        self, session: Session, state: SessionState, last_seq: int, link: Link
    ) -> Opened | None:
        record = state.record
        for span in record.filters:
            if span.end is None:
                self.rooms.join(session, span.filter)
        for ref in record.recent:  # its resends are duplicates here too
            session.recent.seen(ref)
        messages = await self.link.read(record)
        numbering = Renumbering(record, last_seq=last_seq, upto=1 << 62)
        base = (record.stream_seq, record.seq)
        for sseq, subject, payload in messages:
            numbering.feed(sseq, subject, payload)
            if numbering.seq <= last_seq:
                base = (sseq, numbering.seq)
        if not numbering.consistent:
            self.event(
                "session_replay_inconsistent",
                warning=True,
                name=session.name,
                client_last_seq=last_seq,
                stream_seq=numbering.seq,
            )
            return None
        log = session.delivery
        log.restore(last_seq=last_seq, acked=last_seq, pending=())
        state.checkpoints = Checkpoints(stream_seq=base[0], seq=base[1])
        for seq, sseq, payload in numbering.replay:
            if log.append(payload) != seq:  # past max_pending: as an overflow, a gap
                return None
            state.checkpoints.numbered(seq, sseq)
        state.replayed_upto = messages[-1][0] if messages else record.stream_seq
        # The live messages held meanwhile are numbered after the replay, before the session
        # has a connection: they go out with the replay, after welcome.
        self.release(session, state)
        session.attach(link, self.loop.time())
        state.resends_until = self.loop.time() + self.settings.ack_timeout
        return Opened(session, resumed=True, replay=session.replay(last_seq), took_over=False)


def _state(key: str, record: SessionRecord, revision: int) -> SessionState:
    checkpoints = Checkpoints(stream_seq=record.stream_seq, seq=record.seq)
    return SessionState(key=key, record=record, revision=revision, checkpoints=checkpoints)
