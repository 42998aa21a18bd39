"""The orphan sweep's rules over a key-value bucket kept in memory: which records expire and
when, and that the records are read once per death, not at every sweep (a cluster may hold
many). The sweep over a real nats-server is in test_failover.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from securemsg.core.cluster import FilterSpan, PresenceNote, SessionRecord
from securemsg.server.cluster.link import ClusterSettings
from securemsg.server.cluster.orphans import Orphans

TTL, NODE_TIMEOUT = 10.0, 3.0


class Bucket:
    """``sm_sessions`` in memory: what the sweep uses of nats-py's KeyValue."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[int, bytes]] = {}
        self.revision = 0
        self.scans = 0

    def put(self, key: str, record: SessionRecord) -> None:
        self.revision += 1
        self.records[key] = (self.revision, msgspec.json.encode(record))

    def _entry(self, key: str) -> KeyValue.Entry:
        revision, value = self.records[key]
        return KeyValue.Entry("sm_sessions", key, value, revision, None, None, None)

    async def watchall(self, **_: Any) -> Any:
        self.scans += 1
        entries = [self._entry(key) for key in self.records] + [None]

        class Watcher:
            async def updates(self, timeout: float) -> KeyValue.Entry | None:
                return entries.pop(0)

            async def stop(self) -> None:
                pass

        return Watcher()

    async def get(self, key: str) -> KeyValue.Entry:
        if key not in self.records:
            raise KeyNotFoundError
        return self._entry(key)

    async def delete(self, key: str, last: int | None = None) -> bool:
        if key not in self.records or self.records[key][0] != last:
            raise KeyWrongLastSequenceError
        del self.records[key]
        return True


@dataclass
class Link:
    sessions: Bucket
    published: list[PresenceNote] = field(default_factory=list)

    def publish(self, subject: str, payload: bytes, *, headers: None) -> None:
        self.published.append(msgspec.json.decode(payload, type=PresenceNote))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


@dataclass
class Node:
    """The sweeping node "a"; "b" was last heard at ``heard_b``."""

    link: Link
    heard_b: float
    node: str = "a"
    restarts: int = 0
    loop: Clock = field(default_factory=Clock)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)
    settings: ClusterSettings = field(
        default_factory=lambda: ClusterSettings(
            servers=[], node="a", address="", session_ttl=TTL, node_timeout=NODE_TIMEOUT
        )
    )

    @property
    def heard(self) -> dict[str, tuple[float, str]]:
        return {"a": (self.loop.now, ""), "b": (self.heard_b, "")}

    def live_nodes(self) -> list[str]:
        return [n for n in ("a", "b") if self.is_live(n)]

    def is_live(self, node: str) -> bool:
        return self.loop.now - self.heard[node][0] <= NODE_TIMEOUT

    def is_current(self, node: str, boot: str) -> bool:
        return self.is_live(node) and boot == "boot-" + node

    def event(self, event: str, *, warning: bool = False, **fields: Any) -> None:
        self.events.append((event, fields))

    async def free_name(self, key: str, name: str) -> None:
        self.freed.append(name)


def record(name: str, owner: str) -> SessionRecord:
    return SessionRecord(
        name=name, owner=owner, owner_boot="boot-" + owner, start=0, filters=[FilterSpan("r", 1)]
    )


async def test_a_dead_nodes_records_are_read_once_and_expire_session_ttl_after_its_death() -> None:
    bucket = Bucket()
    bucket.put("s-ghost", record("ghost", "b"))
    bucket.put("s-alice", record("alice", "b"))
    bucket.put("s-carol", record("carol", "a"))  # the sweeper's own: never an orphan
    node = Node(Link(bucket), heard_b=90.0)  # b died at 93 (heard at 90, timeout 3)
    orphans = Orphans(node)  # type: ignore[arg-type]  # the parts of a registry it reads
    for now in (100.0, 101.0, 102.5):  # due at 93 + 10 = 103
        node.loop.now = now
        await orphans.sweep()
    assert bucket.scans == 1 and node.events == []
    bucket.put("s-alice", record("alice", "a"))  # alice resumed on a meanwhile
    node.loop.now = 103.0
    await orphans.sweep()
    assert sorted(bucket.records) == ["s-alice", "s-carol"]
    assert node.link.published == [PresenceNote("r", "ghost", "leave", "")]
    assert node.freed == ["ghost"]
    assert [(event, fields["reason"]) for event, fields in node.events] == [
        ("cluster_session_expired", "node_dead")
    ]
    for now in (104.0, 110.0):  # nothing left to do: no reading, no expiry
        node.loop.now = now
        await orphans.sweep()
    assert bucket.scans == 1 and len(node.events) == 1


async def test_only_the_first_live_node_sweeps() -> None:
    bucket = Bucket()
    bucket.put("s-ghost", record("ghost", "c"))
    node = Node(Link(bucket), heard_b=100.0, node="b")  # "a" is alive and sorts first
    node.settings = ClusterSettings(
        servers=[], node="b", address="", session_ttl=TTL, node_timeout=NODE_TIMEOUT
    )
    orphans = Orphans(node)  # type: ignore[arg-type]
    node.loop.now = 200.0
    node.heard_b = 200.0
    await orphans.sweep()
    assert bucket.scans == 0 and "s-ghost" in bucket.records
