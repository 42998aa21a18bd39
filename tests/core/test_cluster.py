"""The cluster's rules without NATS: subjects, the membership rule, and a moved session's
numbering rebuilt from its record exactly as its first node gave it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemsg.core.cluster import (
    Checkpoints,
    CongestedElsewhere,
    CongestionNote,
    FilterSpan,
    Renumbering,
    SessionRecord,
    belongs,
    direct_subject,
    directs_subject,
    filter_subject,
    message_id,
    name_key,
    parse_subject,
    room_subject,
    session_key,
    stream_pending,
    stream_position,
)
from securemsg.core.rooms import RoomRegistry


def test_subjects_carry_names_with_dots_and_rooms_both_ways() -> None:
    subject = room_subject("a.b@c", "chat.x")
    assert subject == "sm.r.a%b@c.chat.x"
    assert parse_subject(subject) == ("r", "a.b@c", "chat.x")
    assert direct_subject("bob.x", "al@ice") == "sm.d.bob%x.al@ice"
    assert parse_subject(direct_subject("bob.x", "al@ice")) == ("d", "al@ice", "bob.x")
    assert directs_subject("bob.x") == "sm.d.bob%x.*"
    assert filter_subject("chat.*.>") == "sm.r.*.chat.*.>"
    assert name_key("bob@example.com") == "bob=example.com"
    with pytest.raises(ValueError):
        parse_subject("sm.x.y")


@pytest.mark.parametrize(
    ("reply", "position"),
    [
        ("$JS.ACK.SECUREMSG.Xy12.1.4071.4070.1764662400000000000.12", 4071),
        ("$JS.ACK.SECUREMSG.Xy12.2.7.9.1764662400000000000.0", 7),
        ("$JS.ACK.hub.ACCHASH.SECUREMSG.Xy12.1.4071.4070.1764662400000000000.12", 4071),
        ("$JS.ACK.hub.ACCHASH.SECUREMSG.Xy12.1.4071.4070.1764662400000000000.12.r4nd", 4071),
    ],
)
def test_the_stream_position_is_read_from_a_delivery_reply_subject(
    reply: str, position: int
) -> None:
    assert stream_position(reply) == position


@pytest.mark.parametrize(
    "reply", ["", "_INBOX.abc.1", "$JS.ACK.SECUREMSG.Xy12.1.4071", "$JS.API.X.Y.1.2.3.4.5"]
)
def test_a_reply_subject_that_is_no_jetstream_delivery_is_refused(reply: str) -> None:
    with pytest.raises(ValueError):
        stream_position(reply)
    with pytest.raises(ValueError):
        stream_pending(reply)


@pytest.mark.parametrize(
    ("reply", "unread"),
    [
        ("$JS.ACK.SECUREMSG.Xy12.1.4071.4070.1764662400000000000.12", 12),
        ("$JS.ACK.SECUREMSG.Xy12.2.7.9.1764662400000000000.0", 0),
        ("$JS.ACK.hub.ACCHASH.SECUREMSG.Xy12.1.4071.4070.1764662400000000000.12", 12),
        ("$JS.ACK.hub.ACCHASH.SECUREMSG.Xy12.1.4071.4070.1764662400000000000.5.r4nd", 5),
    ],
)
def test_what_the_stream_still_holds_is_read_from_a_delivery_reply_subject(
    reply: str, unread: int
) -> None:
    assert stream_pending(reply) == unread


def test_a_session_key_hides_the_token_and_message_ids_differ_per_session() -> None:
    key = session_key("secret-token")
    assert "secret" not in key and len(key) == 64
    assert message_id(key, "1") != message_id(session_key("other"), "1")


def test_membership_follows_the_filter_positions() -> None:
    record = SessionRecord(name="alice", owner="n1", start=10)
    record.joined("chat.*", 20)
    record.left("chat.*", 30)
    record.joined("news", 25)
    assert not belongs(record, "r", "bob", "chat.x", 20)  # joined after 20 was read
    assert belongs(record, "r", "bob", "chat.x", 21)
    assert belongs(record, "r", "bob", "chat.x", 30)
    assert not belongs(record, "r", "bob", "chat.x", 31)  # left
    assert not belongs(record, "r", "alice", "news", 40)  # its own message
    assert belongs(record, "r", "bob", "news", 40)
    assert not belongs(record, "d", "bob", "alice", 10)  # before the session started
    assert belongs(record, "d", "bob", "alice", 11)
    assert belongs(record, "d", "alice", "alice", 11)  # a direct to oneself arrives
    assert not belongs(record, "d", "alice", "bob", 11)


def number_like_a_node(
    stream: list[tuple[int, str, bytes]], changes: dict[int, tuple[str, str]]
) -> tuple[SessionRecord, list[tuple[int, int]]]:
    """What the first node does: joins and leaves carried out between stream messages (at
    the position read so far), deliveries numbered by the room registry as they come."""
    record = SessionRecord(name="alice", owner="n1", start=0)
    rooms: RoomRegistry[str] = RoomRegistry()
    numbered: list[tuple[int, int]] = []  # (seq, stream_seq)
    for sseq, subject, _ in stream:
        if sseq - 1 in changes:
            verb, room_filter = changes[sseq - 1]
            if verb == "join":
                rooms.join("alice", room_filter)
                record.joined(room_filter, sseq - 1)
            else:
                rooms.leave("alice", room_filter)
                record.left(room_filter, sseq - 1)
        kind, sender, target = parse_subject(subject)
        mine = target == "alice" if kind == "d" else sender != "alice" and bool(rooms.match(target))
        if mine:
            numbered.append((len(numbered) + 1, sseq))
    return record, numbered


STREAM = [
    (1, room_subject("bob", "chat.x"), b"1"),
    (2, room_subject("bob", "chat.y"), b"2"),
    (3, direct_subject("alice", "bob"), b"3"),
    (4, room_subject("alice", "chat.x"), b"4"),
    (5, room_subject("carol", "chat.x"), b"5"),
    (6, room_subject("carol", "news"), b"6"),
    (7, room_subject("bob", "chat.y"), b"7"),
    (8, direct_subject("bob", "alice"), b"8"),
    (9, room_subject("bob", "news"), b"9"),
    (10, room_subject("bob", "chat.x"), b"10"),
]
CHANGES = {1: ("join", "chat.*"), 5: ("join", "news"), 7: ("leave", "chat.*")}


@pytest.mark.parametrize("checkpoint", [0, 1, 2, 3])
@pytest.mark.parametrize("last_seq", [3, 4, 5])
def test_a_moved_session_is_renumbered_exactly_from_any_checkpoint(
    checkpoint: int, last_seq: int
) -> None:
    record, numbered = number_like_a_node(STREAM, CHANGES)
    assert numbered == [(1, 2), (2, 3), (3, 5), (4, 6), (5, 7), (6, 9)]
    if checkpoint:
        record.seq, record.stream_seq = numbered[checkpoint - 1]
    renumbering = Renumbering(record, last_seq=last_seq, upto=10)
    for message in STREAM:
        assert renumbering.feed(*message)
    assert renumbering.consistent
    assert [(seq, sseq) for seq, sseq, _ in renumbering.replay] == numbered[last_seq:]


def test_a_client_ahead_of_the_stream_or_behind_the_checkpoint_cannot_resume() -> None:
    record, numbered = number_like_a_node(STREAM, CHANGES)
    ahead = Renumbering(record, last_seq=9, upto=10)
    for message in STREAM:
        ahead.feed(*message)
    assert not ahead.consistent
    record.seq, record.stream_seq = numbered[3]
    assert not Renumbering(record, last_seq=2, upto=10).possible


def test_renumbering_stops_after_its_position() -> None:
    record = SessionRecord(name="alice", owner="n1", start=0, filters=[FilterSpan("chat.*", 0)])
    renumbering = Renumbering(record, last_seq=0, upto=2)
    assert renumbering.feed(*STREAM[0]) and renumbering.feed(*STREAM[1])
    assert not renumbering.feed(*STREAM[2])
    assert [seq for seq, _, _ in renumbering.replay] == [1, 2]


def test_checkpoints_follow_the_acknowledgements() -> None:
    checkpoints = Checkpoints(stream_seq=4, seq=0)
    for seq, sseq in [(1, 5), (2, 9), (3, 12)]:
        checkpoints.numbered(seq, sseq)
    assert not checkpoints.acked(0)
    assert checkpoints.acked(2) and (checkpoints.seq, checkpoints.stream_seq) == (2, 9)
    assert not checkpoints.acked(2)


def test_filters_that_ended_before_the_checkpoint_are_forgotten() -> None:
    record = SessionRecord(name="alice", owner="n1", start=0)
    record.joined("a", 1)
    record.left("a", 5)
    record.joined("b", 3)
    record.trim(5)
    assert [span.filter for span in record.filters] == ["b"]


ROOMS = ["a", "a.b", "a.c", "b"]
FILTERS = ["a", "a.*", "a.>", "*.b", "b", ">"]
NAMES = ["alice", "bob"]

stream_events = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.sampled_from(FILTERS)),
        st.tuples(st.just("leave"), st.sampled_from(FILTERS)),
        st.tuples(st.just("r"), st.sampled_from(NAMES), st.sampled_from(ROOMS)),
        st.tuples(st.just("d"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    ),
    max_size=60,
)


@given(events=stream_events, data=st.data())
@settings(max_examples=300)
def test_any_stream_and_membership_history_renumbers_exactly(
    events: list[tuple[str, ...]], data: st.DataObject
) -> None:
    """The node's way (a room registry, changes between messages) and the record's rule
    agree from every checkpoint and every last_seq the client may hold."""
    record = SessionRecord(name="alice", owner="n1", start=0)
    rooms: RoomRegistry[str] = RoomRegistry()
    stream: list[tuple[int, str, bytes]] = []
    numbered: list[tuple[int, int]] = []
    for event in events:
        position = len(stream)
        if event[0] == "join" and rooms.join("alice", event[1]):
            record.joined(event[1], position)
        elif event[0] == "leave" and rooms.leave("alice", event[1]):
            record.left(event[1], position)
        elif event[0] in ("r", "d"):
            sender, target = event[1], event[2]
            sseq = position + 1
            if event[0] == "r":
                stream.append((sseq, room_subject(sender, target), b"x"))
                mine = sender != "alice" and bool(rooms.match(target))
            else:
                stream.append((sseq, direct_subject(target, sender), b"x"))
                mine = target == "alice"
            if mine:
                numbered.append((len(numbered) + 1, sseq))
    checkpoint = data.draw(st.integers(0, len(numbered)))
    last_seq = data.draw(st.integers(checkpoint, len(numbered)))
    if checkpoint:
        record.seq, record.stream_seq = numbered[checkpoint - 1]
        record.trim(record.stream_seq)
    renumbering = Renumbering(record, last_seq=last_seq, upto=len(stream))
    for message in stream:
        renumbering.feed(*message)
    assert renumbering.consistent
    assert [(seq, sseq) for seq, sseq, _ in renumbering.replay] == numbered[last_seq:]


# -- flow control across nodes ---------------------------------------------------------------


def test_a_remote_congested_session_is_reached_by_its_rooms_and_its_name_not_its_own() -> None:
    elsewhere: CongestedElsewhere[str] = CongestedElsewhere(ttl=3.0)
    assert not elsewhere.by_key  # what the hot path tests
    note = CongestionNote("B", "k1", "bob", ["chat.*", "news"])
    assert elsewhere.heard(note, now=0.0, make=lambda: "bob@B") == "bob@B"
    assert elsewhere.reached("r", "alice", "chat.x") == ["bob@B"]
    assert elsewhere.reached("r", "alice", "news") == ["bob@B"]
    assert elsewhere.reached("r", "alice", "other") == []
    assert elsewhere.reached("r", "bob", "chat.x") == []  # not sent its own message
    assert elsewhere.reached("d", "alice", "bob") == ["bob@B"]
    assert elsewhere.reached("d", "alice", "carol") == []
    # Re-announced with other filters: the same placeholder, matched by the new ones only.
    again = CongestionNote("B", "k1", "bob", ["news"])
    assert elsewhere.heard(again, now=1.0, make=lambda: "another") == "bob@B"
    assert elsewhere.reached("r", "alice", "chat.x") == []
    assert elsewhere.reached("r", "alice", "news") == ["bob@B"]
    assert elsewhere.relieved("k1") == "bob@B"
    assert elsewhere.relieved("k1") is None
    assert elsewhere.reached("r", "alice", "news") == []
    assert elsewhere.reached("d", "alice", "bob") == []
    assert not elsewhere.by_key


def test_remote_congestion_expires_when_not_reannounced_or_its_node_dies() -> None:
    elsewhere: CongestedElsewhere[str] = CongestedElsewhere(ttl=3.0)
    elsewhere.heard(CongestionNote("B", "k1", "bob", ["r"]), now=0.0, make=lambda: "bob")
    elsewhere.heard(CongestionNote("C", "k2", "carol", ["r"]), now=0.0, make=lambda: "carol")
    assert elsewhere.expired(now=2.0, live=lambda node: True) == []
    elsewhere.heard(CongestionNote("B", "k1", "bob", ["r"]), now=2.0, make=lambda: "x")
    assert elsewhere.expired(now=3.5, live=lambda node: True) == ["carol"]  # not heard again
    assert elsewhere.expired(now=3.6, live=lambda node: node != "B") == ["bob"]  # B died
    assert len(elsewhere) == 0
    assert elsewhere.reached("r", "alice", "r") == []
