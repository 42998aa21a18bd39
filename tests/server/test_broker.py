"""The broker on its own: routing, presence, who, the session registry (resume, takeover,
name_taken, expiry) and overflow. It owns no socket: a fake link records what is queued."""

from __future__ import annotations

import msgspec
import pytest
from structlog.testing import capture_logs

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
from securemsg.server.broker import Broker, Link, Opened

BODY = msgspec.Raw(b'"hi"')


class FakeLink:
    """A connection as the broker sees it: frames queued, and maybe a close."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed_with: tuple[str, str] | None = None

    def queue(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close_with(self, code: str, message: str) -> None:
        self.closed_with = (code, message)

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
