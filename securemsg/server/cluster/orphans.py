"""Sessions orphaned by a dead node: they expire ``session_ttl`` after it died, as a
session whose connection dropped expires on one server.

A node killed with its sessions connected leaves their records in ``sm_sessions`` with no
``detached_at``. Their clients usually resume on another node within a second (the record
changes owner); a client that never comes back would otherwise keep its record until the
bucket's max_age and never leave its rooms. One node sweeps, the first live one by name: it
reads the records whose owner is dead, or alive in another incarnation (restarted under its
name), and deletes those past ``session_ttl`` (a delete conditional on the revision it
read, so a resume that won the race keeps its session), then announces that the session
left its rooms and frees its name. A name taken over from such a session ends it the same
way (:meth:`Orphans.expire`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from securemsg.core.cluster import PresenceNote, SessionRecord

if TYPE_CHECKING:
    import asyncio

    from nats.js.kv import KeyValue

    from securemsg.server.cluster.link import ClusterSettings, NatsLink

__all__ = ["Orphans"]

logger = structlog.get_logger("securemsg.server.cluster")

_records = msgspec.json.Decoder(SessionRecord)
#: The node of an expiry's presence notes: no node, so every node (the sweeper too)
#: delivers them to its members.
NO_NODE = ""


class ClusterView(Protocol):
    """What the sweep reads of its node (:class:`~securemsg.server.cluster.registry.
    ClusterRegistry`)."""

    node: str
    settings: ClusterSettings
    link: NatsLink
    heard: dict[str, tuple[float, str]]
    restarts: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def live_nodes(self) -> list[str]: ...

    def is_live(self, node: str) -> bool: ...

    def is_current(self, node: str, boot: str) -> bool: ...

    def event(self, event: str, *, warning: bool = False, **fields: Any) -> None: ...

    async def free_name(self, key: str, name: str) -> None: ...


class Orphans:
    """The sweep of one node; :meth:`sweep` runs every ``node_timeout``. It reads every
    record once per death or restart of a node, not at every sweep (a cluster holds many
    records), and then only the orphans that are due."""

    def __init__(self, registry: ClusterView) -> None:
        self.registry = registry
        #: Orphaned records not due yet: when each is (loop time), and the revision read.
        self._due: dict[str, tuple[float, int | None]] = {}
        #: Dead nodes whose records were all read since they died.
        self._clean: set[str] = set()
        self._swept_once = False
        self._restarts = 0

    def _dead_since(self, owner: str, now: float) -> float:
        heard = self.registry.heard.get(owner)
        if heard is None or self.registry.is_live(owner):
            return now  # died before this node started, or restarted: count from now
        return min(now, heard[0] + self.registry.settings.node_timeout)

    def _scan_needed(self) -> bool:
        """Read every record only when a node died or restarted since the last reading
        (or this node never read them): the orphans found are remembered until due."""
        registry = self.registry
        dead = {node for node in registry.heard if not registry.is_live(node)}
        self._clean &= dead  # a node that came back and may die again
        restarted = registry.restarts != self._restarts
        self._restarts = registry.restarts
        return not self._swept_once or restarted or bool(dead - self._clean)

    async def sweep(self) -> None:
        registry = self.registry
        live = registry.live_nodes()
        if not live or min(live) != registry.node:
            self._due.clear()  # another node sweeps; it read the records itself
            self._swept_once = False
            return
        kv = registry.link.sessions
        assert kv is not None
        if self._scan_needed():
            await self._scan(kv)
        now = registry.loop.time()
        for key, (due, revision) in list(self._due.items()):
            if due <= now and await self._expire_read(kv, key, revision):
                del self._due[key]

    async def _scan(self, kv: KeyValue) -> None:
        registry = self.registry
        now, wall = registry.loop.time(), time.time()
        ttl = registry.settings.session_ttl
        due: dict[str, tuple[float, int | None]] = {}
        for entry in await _entries(kv, registry.settings.request_timeout):
            assert entry.value is not None
            record = _records.decode(entry.value)
            if registry.is_current(record.owner, record.owner_boot):
                continue
            if record.detached_at is not None:
                at = now + (record.detached_at + ttl - wall)
            elif entry.key in self._due:
                at = self._due[entry.key][0]
            else:
                at = self._dead_since(record.owner, now) + ttl
            due[entry.key] = (at, entry.revision)
        self._due = due
        self._swept_once = True
        self._clean |= {node for node in registry.heard if not registry.is_live(node)}

    async def _expire_read(self, kv: KeyValue, key: str, revision: int | None) -> bool:
        """Expire ``key`` if it is still the record read at ``revision``; True when it is
        no orphan any more (expired, resumed or gone), False to try again."""
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return True
        except (NatsError, TimeoutError):
            return False
        if entry.revision != revision or entry.value is None:
            return True  # resumed meanwhile: its new owner writes it
        record = _records.decode(entry.value)
        return await self._expire(kv, key, revision, record, "node_dead")

    async def expire(self, key: str, *, reason: str) -> None:
        """End the orphaned session ``key`` now (its name was taken over)."""
        kv = self.registry.link.sessions
        assert kv is not None
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return
        assert entry.value is not None
        await self._expire(kv, key, entry.revision, _records.decode(entry.value), reason)

    async def _expire(
        self, kv: KeyValue, key: str, revision: int | None, record: SessionRecord, reason: str
    ) -> bool:
        """Delete the record if it is still the one read; True when it is gone."""
        registry = self.registry
        try:
            await kv.delete(key, last=revision)
        except KeyWrongLastSequenceError:
            return True  # resumed (or ended) meanwhile: not ours to expire
        except (NatsError, TimeoutError) as exc:
            logger.debug("cluster_request_failed", request="expire_orphan", error=repr(exc))
            return False
        rooms = [span.filter for span in record.filters if span.end is None]
        for room in rooms:
            note = PresenceNote(room, record.name, "leave", NO_NODE)
            registry.link.publish("sm.presence", msgspec.json.encode(note), headers=None)
        await registry.free_name(key, record.name)
        registry.event(
            "cluster_session_expired",
            name=record.name,
            node=record.owner,
            reason=reason,
            rooms=len(rooms),
        )
        return True


async def _entries(kv: KeyValue, timeout: float) -> list[KeyValue.Entry]:
    """Every record in the bucket now (one ordered consumer, not one request per key)."""
    watcher = await kv.watchall(ignore_deletes=True)
    entries = []
    try:
        while (entry := await watcher.updates(timeout)) is not None:  # type: ignore[no-untyped-call]
            entries.append(entry)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return entries
