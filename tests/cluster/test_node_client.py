"""The node's read of the stream (securemsg/server/cluster/link.py and node_client.py), over
a real nats-server: every message once, in stream order, with its Nats-Msg-Id and what the
stream still holds for the consumer, across a consumer's start and restart; and the node's
publishes written the short way out."""

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
        #: What the stream still held for the consumer at each message.
        self.unread: list[int] = []

    def __call__(
        self, sseq: int, subject: str, data: bytes, msg_id: str | None, unread: int
    ) -> bool:
        self.append((sseq, subject, data, msg_id))
        self.unread.append(unread)
        self.grew.set()
        return False

    async def pause(self) -> None:
        await asyncio.sleep(0)

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


async def test_the_stream_is_read_once_in_order_across_the_consumer_start(
    nats_url: str,
) -> None:
    # Messages stored before the consumer exists and those published after it started: one
    # sequence, in order, each once.
    await wipe(nats_url)
    link = await _link(nats_url)
    try:
        _publish(link, 1, 3000)
        for _ in range(2000):  # at most 20 s
            if (await link.last_seq())[1] >= 3000:
                break
            await asyncio.sleep(0.01)
        seen = Seen()
        await link.follow(0, seen, seen.pause)
        _publish(link, 3001, 3000)
        await seen.until(6000)
        await asyncio.sleep(0.2)
    finally:
        await link.close()
    assert [sseq for sseq, *_ in seen] == list(range(1, 6001))
    assert [int(data) for _, _, data, _ in seen] == list(range(1, 6001))
    assert {subject for _, subject, _, _ in seen} == {"sm.r.alice.feed"}
    assert [msg_id for *_, msg_id in seen] == [f"id:{n}" for n in range(1, 6001)]
    # Both ways pass on what the stream still holds for the consumer (flow control counts
    # it): 2,999 behind the first of the 3,000 stored before it, none behind the last.
    assert seen.unread[0] == 2999
    assert seen.unread[-1] == 0


async def test_after_its_consumer_is_lost_the_node_reads_on_from_where_it_was(
    nats_url: str,
) -> None:
    # nats-py restarts an ordered consumer that went quiet after the last stream position it
    # knows was read: the node must read on from there, not read the stream again.
    await wipe(nats_url)
    link = await _link(nats_url)
    try:
        seen = Seen()
        follower = await link.follow(0, seen, seen.pause)
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


async def test_a_batch_of_publishes_is_stored_in_order_with_its_ids_and_deduplicated(
    nats_url: str,
) -> None:
    # The node writes a loop turn's publishes itself; what needs nats-py's care (a header
    # to clean up) goes nats-py's way, in order.
    await wipe(nats_url)
    link = await _link(nats_url)
    try:
        seen = Seen()
        await link.follow(0, seen, seen.pause)
        subject = room_subject("alice", "feed")
        ids = ["k:1", "k:2", " k:3 ", "k:\u00e9", "k:5\r\nX-Evil: 1", "k:1", None, "k:7"]
        for n, msg_id in enumerate(ids):
            headers = None if msg_id is None else {"Nats-Msg-Id": msg_id}
            link.publish(subject, b"%d" % n, headers=headers)
        link.publish(subject, b"8", headers={"Nats-Msg-Id": "k:8"})
        await seen.until(8)
        await asyncio.sleep(0.3)
    finally:
        await link.close()
    # k:1 sent again is a duplicate; nats-py strips the space of " k:3 " and turns the line
    # break into a space.
    assert [(data, msg_id) for _, _, data, msg_id in seen] == [
        (b"0", "k:1"),
        (b"1", "k:2"),
        (b"2", "k:3"),
        (b"3", "k:\u00e9"),
        (b"4", "k:5  X-Evil: 1"),
        (b"6", None),
        (b"7", "k:7"),
        (b"8", "k:8"),
    ]
