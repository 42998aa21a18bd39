"""The broker on its own: routing, presence, who, the session registry (resume, takeover,
name_taken, expiry) and overflow. It owns no socket: a fake link records what is queued."""

from __future__ import annotations

import msgspec
import pytest
from structlog.testing import capture_logs

from securemsg.core.delivery import splice_frame
from securemsg.core.frames import FrameDecoder
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Delivery,
    Direct,
    Hello,
    Join,
    Leave,
    Members,
    Presence,
    Publish,
    ServerMessage,
    decode_server,
)
from securemsg.core.server_session import ServerSession
from securemsg.errors import ProtocolError
from securemsg.server.broker import DEDUP_ID_BYTES, Broker, Link, Opened

BODY = msgspec.Raw(b'"hi"')


class FakeLink:
    """A connection as the broker sees it: frames queued, and maybe a close."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed_with: tuple[str, str] | None = None
        self.writable = True
        self.reading = True

    def queue(self, frame: bytes) -> None:
        self.frames.append(frame)

    queue_message = queue

    def queue_delivery(self, prefix: bytes, seq: int) -> None:
        self.frames.append(splice_frame(prefix, seq))

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def close_with(self, code: str, message: str) -> None:
        self.closed_with = (code, message)

    @staticmethod
    def decode(frame: bytes) -> list[ServerMessage]:
        return [decode_server(payload) for payload in FrameDecoder(1 << 24).feed(frame)]

    def received(self) -> list[ServerMessage]:
        """What was queued, decoded, and forgotten."""
        decoder = FrameDecoder()
        found = [decode_server(payload) for frame in self.frames for payload in decoder.feed(frame)]
        self.frames.clear()
        return found


def open_session(
    broker: Broker, name: str, *, token: str | None = None, last_seq: int = 0, now: float = 0.0
) -> tuple[ServerSession[Link], FakeLink, Opened]:
    link = FakeLink()
    hello = Hello(version=PROTOCOL_VERSION, name=name, session=token, last_seq=last_seq)
    opened = broker.open(hello, identity=None, link=link, now=now)
    return opened.session, link, opened


def publish(broker: Broker, session: ServerSession[Link], room: str, msg_id: str) -> None:
    broker.publish(session, Publish(room=room, body=BODY, id=msg_id), 1.0)


def ids_of(messages: list[ServerMessage]) -> list[tuple[str | None, int]]:
    return [(m.id, m.seq) for m in messages if isinstance(m, Delivery)]


# -- routing ------------------------------------------------------------------------------------


def test_a_publish_reaches_every_member_but_the_sender_each_with_its_own_seq() -> None:
    broker = Broker()
    alice, alice_link, _ = open_session(broker, "alice")
    bob, bob_link, _ = open_session(broker, "bob")
    carol, carol_link, _ = open_session(broker, "carol")
    for session in (alice, bob, carol):
        broker.join(session, "chat")
    broker.join(carol, "other")
    publish(broker, carol, "other", "0")  # carol's own room: nobody else, no seq used
    for link in (alice_link, bob_link, carol_link):
        link.received()  # presence
    publish(broker, alice, "chat", "1")
    publish(broker, bob, "chat", "2")
    assert ids_of(alice_link.received()) == [("2", 1)]
    assert ids_of(bob_link.received()) == [("1", 1)]
    assert ids_of(carol_link.received()) == [("1", 1), ("2", 2)]
    assert broker.messages_routed == 4


def test_wildcards_route_by_token() -> None:
    broker = Broker()
    sender, _, _ = open_session(broker, "sender")
    one, one_link, _ = open_session(broker, "one")
    rest, rest_link, _ = open_session(broker, "rest")
    broker.join(one, "sensors.*")
    broker.join(rest, "sensors.>")
    broker.join(rest, "sensors.kitchen")  # two matching filters: still delivered once
    one_link.received()
    rest_link.received()
    publish(broker, sender, "sensors.kitchen", "a")
    publish(broker, sender, "sensors.kitchen.temp", "b")
    publish(broker, sender, "sensors", "c")
    assert ids_of(one_link.received()) == [("a", 1)]
    assert ids_of(rest_link.received()) == [("a", 1), ("b", 2)]


def test_a_direct_reaches_the_named_user_only() -> None:
    broker = Broker()
    alice, alice_link, _ = open_session(broker, "alice")
    _, bob_link, _ = open_session(broker, "bob")
    assert broker.direct(alice, Direct(to="bob", body=BODY, id="d", re="r"), 1.0)
    [message] = bob_link.received()
    assert isinstance(message, Delivery)
    assert (message.sender, message.to, message.id, message.re, message.seq) == (
        "alice",
        "bob",
        "d",
        "r",
        1,
    )
    assert not broker.direct(alice, Direct(to="nobody", body=BODY, id="e"), 1.0)
    assert alice_link.received() == []


# -- presence and who -----------------------------------------------------------------------


def test_presence_goes_to_the_other_members_on_join_and_leave() -> None:
    broker = Broker()
    alice, alice_link, _ = open_session(broker, "alice")
    bob, bob_link, _ = open_session(broker, "bob")
    broker.join(alice, "chat")
    broker.join(bob, "chat")
    broker.join(bob, "chat")  # already a member: nothing to tell
    assert broker.leave(bob, "chat")
    assert not broker.leave(bob, "chat")
    assert alice_link.received() == [
        Presence(room="chat", name="bob", event="join"),
        Presence(room="chat", name="bob", event="leave"),
    ]
    assert bob_link.received() == []


def test_presence_on_a_pattern_goes_to_those_who_joined_that_pattern() -> None:
    broker = Broker()
    alice, alice_link, _ = open_session(broker, "alice")
    bob, _, _ = open_session(broker, "bob")
    broker.join(alice, "sensors.*")
    broker.join(bob, "sensors.*")
    assert alice_link.received() == [Presence(room="sensors.*", name="bob", event="join")]


def test_who_names_each_member_once_sorted_with_the_ref() -> None:
    broker = Broker()
    for name in ("carol", "alice"):
        session, _, _ = open_session(broker, name)
        broker.join(session, "chat")
        broker.join(session, "*")  # matches chat too: still named once
    link = FakeLink()
    link.queue(broker.who("chat", "7"))
    assert link.received() == [Members(room="chat", names=["alice", "carol"], ref="7")]


def test_who_never_answers_past_max_frame_and_says_when_it_cut_the_list() -> None:
    # Issue 11: 16,500 sessions with 64-character names made a members frame of more than
    # 1 MiB, which the client could not read: its who stayed in the outbox for good.
    broker = Broker(max_frame=1 << 16)
    names = [f"{index:05d}" + "n" * 59 for index in range(1500)]  # ~100 KB of names
    for name in names:
        session, _, _ = open_session(broker, name)
        broker.join(session, "crowd")
        broker.detach(session, session.link, 0.0)  # type: ignore[arg-type]
    frame = broker.who("crowd", "r" * 128)
    assert len(frame) <= 1 << 16
    [members] = FakeLink.decode(frame)
    assert isinstance(members, Members) and members.truncated
    assert 900 < len(members.names) < 1500 and members.names == names[: len(members.names)]
    assert members.names.truncated  # type: ignore[attr-defined]  # what the client sees
    assert FakeLink.decode(broker.who("nobody", None)) == [Members(room="nobody", names=[])]
    assert b"truncated" not in broker.who("nobody", None)


# -- the session registry ---------------------------------------------------------------------


def test_a_resume_takes_over_a_live_session_and_replays_after_last_seq() -> None:
    broker = Broker()
    sender, _, _ = open_session(broker, "sender")
    bob, old_link, _ = open_session(broker, "bob")
    broker.join(bob, "chat")
    for msg_id in "abc":
        publish(broker, sender, "chat", msg_id)
    again, new_link, opened = open_session(broker, "bob", token=bob.token, last_seq=1, now=5.0)
    assert again is bob and opened.resumed and opened.took_over
    assert old_link.closed_with is not None and old_link.closed_with[0] == "session_taken_over"
    assert bob.link is new_link and bob.expires_at is None
    decoder = FrameDecoder()
    replayed = [decode_server(p) for frame in opened.replay for p in decoder.feed(frame)]
    assert ids_of(replayed) == [("b", 2), ("c", 3)]
    # The old connection going away later does not detach the new one.
    broker.detach(bob, old_link, now=6.0)
    assert bob.link is new_link


def test_a_name_held_by_a_connected_session_is_refused() -> None:
    broker = Broker()
    open_session(broker, "bob")
    with pytest.raises(ProtocolError) as info:
        open_session(broker, "bob")
    assert info.value.code == "name_taken"


def test_a_name_held_by_a_detached_session_goes_to_a_new_session() -> None:
    broker = Broker()
    old, old_link, _ = open_session(broker, "bob")
    broker.join(old, "chat")
    broker.detach(old, old_link, now=1.0)
    new, _, opened = open_session(broker, "bob", token="not-the-token")
    assert new is not old and not opened.resumed
    assert broker.by_name["bob"] is new and old.token not in broker.by_token
    assert broker.rooms.filters_of(old) == frozenset()


def test_a_hello_the_policy_refuses_opens_nothing() -> None:
    broker = Broker(token="sesame")
    with pytest.raises(ProtocolError) as info:
        open_session(broker, "bob")
    assert info.value.code == "unauthorized"
    assert broker.by_name == {} and broker.by_token == {}


def test_detach_keeps_the_session_until_the_ttl_and_end_forgets_it() -> None:
    broker = Broker(session_ttl=30.0)
    alice, alice_link, _ = open_session(broker, "alice")
    bob, bob_link, _ = open_session(broker, "bob")
    broker.join(alice, "chat")
    broker.join(bob, "chat")
    alice_link.received()
    broker.detach(bob, bob_link, now=10.0)
    assert bob.link is None and bob.expires_at == 40.0
    assert broker.by_token[bob.token] is bob  # resumable
    assert broker.end(bob, reason="expired") == ["chat"]
    assert bob.expires_at is None
    assert "bob" not in broker.by_name and bob.token not in broker.by_token
    assert alice_link.received() == [Presence(room="chat", name="bob", event="leave")]


def test_messages_for_a_detached_session_are_kept_for_its_resume() -> None:
    broker = Broker()
    sender, _, _ = open_session(broker, "sender")
    bob, bob_link, _ = open_session(broker, "bob")
    broker.join(bob, "chat")
    broker.detach(bob, bob_link, now=1.0)
    publish(broker, sender, "chat", "a")
    assert bob_link.frames == []
    _, _, opened = open_session(broker, "bob", token=bob.token, now=2.0)
    assert opened.resumed and not opened.took_over and len(opened.replay) == 1


# -- max_sessions and max_disconnected_bytes (issue 11) ------------------------------------------


def test_past_max_sessions_the_session_disconnected_longest_ends_for_a_new_one() -> None:
    # Issue 11: with max_connections 100 one client made 2,000 sessions (connect, hello,
    # drop), each kept for session_ttl and each receiving every message.
    broker = Broker(max_sessions=3)
    sessions = {name: open_session(broker, name)[:2] for name in ("a", "b", "c")}
    broker.join(sessions["b"][0], "chat")
    broker.detach(*sessions["b"], now=1.0)
    broker.detach(*sessions["a"], now=2.0)
    with capture_logs() as logs:
        open_session(broker, "d")
    assert sorted(broker.by_name) == ["a", "c", "d"] and len(broker.by_token) == 3
    [evicted] = [e for e in logs if e["event"] == "session_evicted"]
    assert (evicted["name"], evicted["limit"]) == ("b", "max_sessions")
    assert broker.rooms.filters_of(sessions["b"][0]) == frozenset()
    # b comes back: a new session, so its client learns of the gap (resumed false).
    _, _, opened = open_session(broker, "b", token=sessions["b"][0].token)
    assert not opened.resumed
    assert sorted(broker.by_name) == ["b", "c", "d"]  # a, the longest disconnected, went


def test_past_max_sessions_with_none_disconnected_a_new_session_is_refused() -> None:
    broker = Broker(max_sessions=2)
    open_session(broker, "a")
    open_session(broker, "b")
    with pytest.raises(ProtocolError) as info:
        open_session(broker, "c")
    assert info.value.code == "server_busy" and "max_sessions" in info.value.message
    assert sorted(broker.by_name) == ["a", "b"]


def test_the_bytes_held_for_disconnected_sessions_stay_within_their_budget() -> None:
    broker = Broker(max_disconnected_bytes=1_000)
    sender, _, _ = open_session(broker, "sender")
    away = [open_session(broker, f"away{index}")[:2] for index in range(3)]
    for index, (session, link) in enumerate(away):
        broker.join(session, "chat")
        broker.detach(session, link, now=float(index))
    with capture_logs() as logs:
        for index in range(10):
            publish(broker, sender, "chat", str(index))  # ~100 bytes for each of three
            assert broker.disconnected_bytes <= 1_000
    assert broker.disconnected_bytes == sum(s.delivery.pending_bytes for s in broker.disconnected)
    evicted = [e["name"] for e in logs if e["event"] == "session_evicted"]
    assert evicted[:2] == ["away0", "away1"]  # the longest disconnected first
    assert [s.name for s in broker.disconnected] == ["away2"]
    # A resume takes a session's bytes off the budget; an end does too.
    _, _, opened = open_session(broker, "away2", token=away[2][0].token)
    assert opened.resumed and broker.disconnected_bytes == 0 and not broker.disconnected


def test_the_dedup_sets_of_disconnected_sessions_count_in_their_budget() -> None:
    # Issue 11: most of an idle session is its dedup set (up to 2 x dedup_window ids).
    broker = Broker(max_disconnected_bytes=50 * DEDUP_ID_BYTES)
    quiet, quiet_link, _ = open_session(broker, "quiet")
    busy, busy_link, _ = open_session(broker, "busy")
    for index in range(40):
        quiet.recent.seen(f"q{index}")
        busy.recent.seen(f"b{index}")
    broker.detach(quiet, quiet_link, now=1.0)
    assert broker.disconnected_bytes == 40 * DEDUP_ID_BYTES
    broker.detach(busy, busy_link, now=2.0)  # 80 ids in all: the longest away goes
    assert [s.name for s in broker.disconnected] == ["busy"]
    assert broker.disconnected_bytes == 40 * DEDUP_ID_BYTES and "quiet" not in broker.by_name


# -- overflow -----------------------------------------------------------------------------------


def test_past_max_pending_the_session_ends_and_its_link_is_closed_slow_consumer() -> None:
    broker = Broker(max_pending=3)
    sender, _, _ = open_session(broker, "sender")
    bob, bob_link, _ = open_session(broker, "bob")
    carol, carol_link, _ = open_session(broker, "carol")
    broker.join(bob, "chat")
    broker.join(carol, "chat")
    bob_link.received()
    with capture_logs() as logs:
        for index in range(4):
            publish(broker, sender, "chat", str(index))
            carol.delivery.ack(carol.delivery.last_seq)  # carol keeps up, bob does not
    assert bob_link.closed_with == ("slow_consumer", "more than 3 messages unacknowledged")
    assert bob.link is None and "bob" not in broker.by_name
    assert bob.token not in broker.by_token  # a resume starts afresh, and learns of the gap
    assert [e for e in logs if e["event"] == "session_overflowed"] == [
        {
            "event": "session_overflowed",
            "log_level": "warning",
            "session": bob.id,
            "name": "bob",
            "pending": 3,
            "pending_bytes": bob.delivery.pending_bytes,
            "max_pending": 3,
        }
    ]
    assert len(ids_of(carol_link.received())) == 4
    assert ids_of(bob_link.received()) == [("0", 1), ("1", 2), ("2", 3)]


def test_a_resent_join_after_a_leave_does_not_rejoin() -> None:
    broker = Broker()
    alice, alice_link, _ = open_session(broker, "alice")
    for request in (Join(room="chat", id="1"), Leave(room="chat", id="2")) * 2:
        alice.receive(request, now=0.0, ts=1.0, router=broker)
    assert broker.rooms.filters_of(alice) == frozenset()
    alice_link.queue(broker.who("chat", None))
    assert alice_link.received() == [Members(room="chat", names=[])]


# -- flow control ---------------------------------------------------------------------------------


def congested_pair(
    *, max_pending: int = 8
) -> tuple[Broker, ServerSession[Link], FakeLink, ServerSession[Link], FakeLink]:
    """A publisher and a subscriber of "chat", with a small delivery log."""
    broker = Broker(max_pending=max_pending)
    pub, pub_link, _ = open_session(broker, "pub")
    sub, sub_link, _ = open_session(broker, "sub")
    broker.join(sub, "chat")
    return broker, pub, pub_link, sub, sub_link


def test_a_publisher_stops_being_read_half_way_to_max_pending_and_goes_on_at_a_quarter() -> None:
    broker, pub, pub_link, sub, sub_link = congested_pair(max_pending=8)
    for n in range(3):
        publish(broker, pub, "chat", str(n))
    assert pub_link.reading
    publish(broker, pub, "chat", "3")  # the 4th of 8: half way
    assert not pub_link.reading
    assert sub.delivery.congested and broker.stalled == {sub}
    # Acks that leave more than a quarter pending change nothing.
    assert not sub.delivery.ack(1)
    assert not pub_link.reading
    assert sub.delivery.ack(2)  # 2 of 8 left: relieved
    broker.relieved(sub)
    assert pub_link.reading and not broker.stalled and pub.waiting_on is None
    assert [seq for _, seq in ids_of(sub_link.received())] == [1, 2, 3, 4]


def test_a_burst_never_overflows_a_session_whose_publisher_is_paused_in_time() -> None:
    broker, pub, pub_link, sub, sub_link = congested_pair(max_pending=8)
    sent = 0
    while pub_link.reading:  # the driver stops carrying out publishes once paused
        publish(broker, pub, "chat", str(sent))
        sent += 1
    assert sent == 4 and sub_link.closed_with is None
    assert len(sub.delivery) == 4 < sub.delivery.max_pending


def test_a_congested_session_is_measured_in_bytes_too() -> None:
    broker = Broker(max_pending=1_000, max_pending_bytes=4_000)
    pub, pub_link, _ = open_session(broker, "pub")
    sub, _, _ = open_session(broker, "sub")
    broker.join(sub, "chat")
    big = msgspec.Raw(b'"' + b"x" * 900 + b'"')
    for n in range(3):
        broker.publish(pub, Publish(room="chat", body=big, id=str(n)), 1.0)
    assert not pub_link.reading  # ~3 KB of 4 KB: past half, though 3 of 1,000 messages
    assert sub.delivery.pending_bytes >= 2_000


def test_a_stuck_subscriber_is_cut_after_the_timeout_and_its_publisher_goes_on() -> None:
    broker, pub, pub_link, sub, sub_link = congested_pair(max_pending=8)
    for n in range(4):
        publish(broker, pub, "chat", str(n))
    assert not pub_link.reading
    assert broker.check_stalled(10.0, timeout=1.0) == []  # first seen stalled now
    assert broker.check_stalled(10.9, timeout=1.0) == []
    with capture_logs() as logs:
        assert broker.check_stalled(11.0, timeout=1.0) == [sub]
    assert sub_link.closed_with is not None and sub_link.closed_with[0] == "slow_consumer"
    assert [log["event"] for log in logs] == ["slow_consumer"]
    assert logs[0]["waiting_publishers"] == 1
    assert pub_link.reading and not broker.stalled
    assert broker.by_name.get("sub") is None  # ended: a resume learns of the gap


def test_a_subscriber_that_acknowledges_is_not_cut_however_long_it_stays_congested() -> None:
    broker, pub, pub_link, sub, _ = congested_pair(max_pending=8)
    for n in range(4):
        publish(broker, pub, "chat", str(n))
    broker.check_stalled(0.0, timeout=1.0)
    for step in range(1, 10):
        sub.acked_at = step * 0.9  # what ServerSession.receive records for an ack that advances
        assert broker.check_stalled(step * 0.9 + 0.5, timeout=1.0) == []
    assert not pub_link.reading


def test_a_disconnected_publisher_waits_for_nobody() -> None:
    broker, pub, pub_link, sub, _ = congested_pair(max_pending=8)
    for n in range(4):
        publish(broker, pub, "chat", str(n))
    broker.detach(pub, pub_link, 0.0)
    assert not sub.waiters and not broker.stalled and pub.waiting_on is None


def test_a_subscriber_that_leaves_for_good_releases_its_publishers() -> None:
    broker, pub, pub_link, sub, _ = congested_pair(max_pending=8)
    for n in range(4):
        publish(broker, pub, "chat", str(n))
    broker.end(sub, reason="bye")
    assert pub_link.reading and not broker.stalled


def test_deliveries_wait_in_the_log_while_the_connection_cannot_write_and_keep_their_order() -> (
    None
):
    broker, pub, _, sub, sub_link = congested_pair(max_pending=100)
    publish(broker, pub, "chat", "a")
    sub_link.writable = False
    publish(broker, pub, "chat", "b")
    publish(broker, pub, "chat", "c")
    sub_link.writable = True
    publish(broker, pub, "chat", "d")  # not before b and c: they have not gone out yet
    assert ids_of(sub_link.received()) == [("a", 1)]
    for frame in sub.delivery.unsent():  # what the driver does when its buffer drains
        sub_link.queue(frame)
    assert ids_of(sub_link.received()) == [("b", 2), ("c", 3), ("d", 4)]
    publish(broker, pub, "chat", "e")
    assert ids_of(sub_link.received()) == [("e", 5)]
