"""The node's read of the stream (securemsg/server/cluster/follower.py), over a real
nats-server: every message once, in stream order, with its Nats-Msg-Id, whichever way it
took in (the short way, or nats-py's callback for what came first or after a restart)."""

from __future__ import annotations

import asyncio

import pytest

from securemsg.core.cluster import room_subject
from securemsg.server.cluster.link import STREAM, ClusterSettings, NatsLink
from tests.cluster.conftest import wipe

pytestmark = pytest.mark.timeout(60)


class Seen(list[tuple[int, str, bytes, "str | None"]]):
    """What the handler was given; :meth:`until` waits for ``count`` messages."""

    def __init__(self) -> None:
        super().__init__()
        self.grew = asyncio.Event()

    def __call__(self, sseq: int, subject: str, data: bytes, msg_id: str | None) -> None:
        self.append((sseq, subject, data, msg_id))
        self.grew.set()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(20):
            while len(self) < count:  # bounded by the timeout
                self.grew.clear()
                await self.grew.wait()


async def _link(nats_url: str) -> NatsLink:
    async def back() -> None:
        pass

    settings = ClusterSettings(servers=[nats_url], node="t", address="127.0.0.1:1")
    link = NatsLink(settings, on_lost=lambda: None, on_back=back)
    await link.connect()
    return link


def _publish(link: NatsLink, first: int, count: int) -> None:
    for n in range(first, first + count):
        subject = room_subject("alice", "feed")
        link.publish(subject, str(n).encode(), headers={"Nats-Msg-Id": f"id:{n}"})


async def test_the_stream_is_read_once_in_order_across_the_start_of_the_short_way(
    nats_url: str,
) -> None:
    # Messages stored before the consumer exists arrive while nats-py is still setting it
    # up: they go its way (queued), and the short way must not overtake them.
    await wipe(nats_url)
    link = await _link(nats_url)
    try:
        _publish(link, 1, 3000)
        for _ in range(2000):  # at most 20 s
            if (await link.last_seq())[1] >= 3000:
                break
            await asyncio.sleep(0.01)
        seen = Seen()
        await link.follow(0, seen)
        _publish(link, 3001, 3000)
        await seen.until(6000)
        await asyncio.sleep(0.2)
    finally:
        await link.close()
    assert [sseq for sseq, *_ in seen] == list(range(1, 6001))
    assert [int(data) for _, _, data, _ in seen] == list(range(1, 6001))
    assert {subject for _, subject, _, _ in seen} == {"sm.r.alice.feed"}
    assert [msg_id for *_, msg_id in seen] == [f"id:{n}" for n in range(1, 6001)]


async def test_after_its_consumer_is_lost_the_node_reads_on_from_where_it_was(
    nats_url: str,
) -> None:
    # nats-py restarts an ordered consumer that went quiet after the last stream position it
    # knows was read: the short way must keep that position, or the stream is read again.
    await wipe(nats_url)
    link = await _link(nats_url)
    try:
        seen = Seen()
        follower = await link.follow(0, seen)
        _publish(link, 1, 500)
        await seen.until(500)
        info = await follower.consumer_info()
        await link.js.delete_consumer(STREAM, info.name)
        await asyncio.sleep(3.5)  # two missed idle heartbeats (1 s): nats-py starts again
        _publish(link, 501, 500)
        await seen.until(1000)
        await asyncio.sleep(0.3)
    finally:
        await link.close()
    assert [sseq for sseq, *_ in seen] == list(range(1, 1001))
