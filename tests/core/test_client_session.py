"""The client's session rules, sans-I/O: server frames in as bytes (through the core client
connection), session events and client frames out, with a fake clock."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemsg.core.client_session import (
    Acknowledged,
    Answered,
    ClientSession,
    Flush,
    FlushCompleted,
    Refused,
    ReplyReceived,
    SessionEvent,
)
from securemsg.core.connection import Client, MessageReceived, PongReceived
from securemsg.core.frames import FrameDecoder
from securemsg.core.messages import (
    Ack,
    Bye,
    ClientMessage,
    Delivery,
    Error,
    Heartbeat,
    Hello,
    Join,
    Leave,
    Members,
    Message,
    Ping,
    Pong,
    Presence,
    Publish,
    ServerAck,
    Welcome,
    Who,
    decode_client,
    encode_frame_of,
)

PREFIX = "rq-test-"


def welcome(*, resumed: bool, max_frame: int = 1 << 20) -> bytes:
    heartbeat = Heartbeat(interval=10.0, timeout=30.0)
    return encode_frame_of(
        Welcome(version=2, session="s", name="alice", resumed=resumed, heartbeat=heartbeat,
                max_frame=max_frame)
    )  # fmt: skip


def delivery(seq: int, body: str = "hi", **fields: Any) -> bytes:
    fields.setdefault("room", "chat")
    raw = msgspec.Raw(msgspec.json.encode(body))
    return encode_frame_of(Delivery(sender="bob", body=raw, ts=1.0, seq=seq, **fields))


def ack(*ids: str) -> bytes:
    return encode_frame_of(ServerAck(ids=list(ids)))


def refusal(ref: str, code: str = "rate_limited", text: str = "slow down") -> bytes:
    return encode_frame_of(Error(code=code, message=text, ref=ref))


def publish(body: int = 0) -> Any:
    return lambda msg_id: Publish(room="r", body=msgspec.Raw(b"%d" % body), id=msg_id)


class Link:
    """A ClientSession over one core client connection at a time, driven like the mailbox
    drives it; the clock is ``now``, moved by hand."""

    def __init__(self, *, max_outbox: int = 100) -> None:
        self.now = 0.0
        self.session = ClientSession(max_outbox=max_outbox, request_prefix=PREFIX)
        self.conn: Client | None = None

    def connect(self, *, resumed: bool, rooms: Iterable[str] = (), then: bytes = b"") -> None:
        """A new connection, welcomed (with ``then`` in the same read)."""
        self.now += 1.0
        self.conn = Client(now=self.now)
        self.conn.hello(Hello(version=2, name="alice"))
        self.conn.data_to_send()
        events = self.conn.receive_data(welcome(resumed=resumed) + then, self.now)
        assert type(events[0].message) is Welcome  # type: ignore[union-attr]
        for frame in self.session.attach(resumed=resumed, rooms=rooms):
            self.conn.send_frame(frame)
        self.early = self.session.events_received(events[1:])

    def submit(self, make: Any = None) -> str:
        frame = self.session.submit(make or publish())
        if self.conn is not None:
            self.conn.send_frame(frame)
        return self.session.last_id

    def feed(self, *frames: bytes) -> list[SessionEvent]:
        """One read of these frames; the events, with every message taken at once and the
        ack that makes due sent, as the mailbox does for an application that keeps up."""
        assert self.conn is not None
        self.now += 0.01
        events = self.session.events_received(self.conn.receive_data(b"".join(frames), self.now))
        due = self.session.ack_due(None)
        if due is not None:
            self.conn.send(Ack(seq=due))
        return events

    def sent(self) -> list[ClientMessage]:
        assert self.conn is not None
        decoder = FrameDecoder()
        return [decode_client(f) for f in decoder.feed(b"".join(self.conn.data_to_send()))]


def kinds(events: list[SessionEvent]) -> list[str]:
    return [type(event).__name__ for event in events]


# -- sending ------------------------------------------------------------------------------------


def test_requests_get_increasing_ids_and_stay_in_the_outbox_until_answered() -> None:
    link = Link()
    link.connect(resumed=True)
    assert [link.submit() for _ in range(3)] == ["1", "2", "3"]
    assert [m.id for m in link.sent()] == ["1", "2", "3"]  # type: ignore[union-attr]
    assert len(link.session.outbox) == 3
    assert link.feed(ack("1", "3")) == [Acknowledged(["1", "3"])]
    assert link.session.outbox.unacked() == [encode_frame_of(publish()("2"))]


def test_a_request_over_the_servers_max_frame_is_refused_and_not_kept() -> None:
    link = Link()
    link.session.max_frame = 100
    big = lambda msg_id: Publish(room="r", body=msgspec.Raw(b'"%s"' % (b"x" * 200)), id=msg_id)  # noqa: E731
    with pytest.raises(ValueError, match="exceeds the server's max_frame of 100 bytes"):
        link.session.submit(big)
    assert len(link.session.outbox) == 0


def test_a_resumed_session_resends_the_unanswered_requests_in_order_with_their_ids() -> None:
    link = Link()
    link.connect(resumed=True)
    for _ in range(3):
        link.submit()
    link.feed(ack("2"))
    link.connect(resumed=True, rooms=["chat"])  # the rooms still hold: no join
    assert [(type(m).__name__, m.id) for m in link.sent()] == [("Publish", "1"), ("Publish", "3")]  # type: ignore[union-attr]


def test_a_new_session_joins_its_rooms_before_the_resends_and_numbers_from_one() -> None:
    link = Link()
    link.connect(resumed=True)
    link.feed(delivery(1), delivery(2))
    link.submit(lambda msg_id: Leave(room="news", id=msg_id))
    link.connect(resumed=False, rooms=["chat", "news"], then=delivery(1, "new"))
    sent = link.sent()
    assert [type(m).__name__ for m in sent] == ["Join", "Join", "Leave"]
    assert [m.id for m in sent] == ["2", "3", "1"]  # type: ignore[union-attr]
    assert sent[1] == Join(room="news", id="3")  # so the resent leave still comes after it
    # The new session's seq 1 is new, though the old one had delivered up to 2.
    assert [m.body for m in link.early if type(m) is Message] == ["new"]
    assert link.session.inbox.last_seq == 1


# -- receiving ----------------------------------------------------------------------------------


def test_replayed_messages_are_dropped_and_one_cumulative_ack_covers_what_was_taken() -> None:
    link = Link()
    link.connect(resumed=True)
    events = link.feed(delivery(1), delivery(2), delivery(2), delivery(3))
    assert [m.seq for m in events if type(m) is Message] == [1, 2, 3]
    assert link.feed(delivery(3)) == []  # nothing new: no ack either
    assert link.sent() == [Ack(seq=3)]


def test_an_ack_covers_only_what_the_application_took_and_a_resume_starts_there() -> None:
    link = Link()
    link.connect(resumed=True)
    session = link.session
    events = session.events_received(link.conn.receive_data(delivery(1) + delivery(2), 1.0))  # type: ignore[union-attr]
    assert kinds(events) == ["Message", "Message"]  # no ack on arrival
    assert session.ack_due(1) is None  # seq 1 not taken yet: nothing is due
    assert session.ack_due(2) == 1  # 1 taken, 2 waiting
    assert session.last_seq == 1  # a resume asks the server for 2 again
    assert session.ack_due(2) is None  # once
    assert session.ack_due(None) == 2  # all taken
    assert session.last_seq == 2


def test_replies_and_skipped_messages_count_as_taken_on_arrival() -> None:
    link = Link()
    link.connect(resumed=True)
    session = link.session
    token = session.request_token()
    frames = delivery(1, re=token) + delivery(2, "late", re=token) + delivery(3)
    session.events_received(link.conn.receive_data(frames, 1.0))  # type: ignore[union-attr]
    assert session.ack_due(3) == 2  # the reply and the dropped one are taken; 3 waits


def test_the_first_reply_to_a_request_token_answers_it_and_never_reaches_the_application() -> None:
    link = Link()
    link.connect(resumed=True)
    token = link.session.request_token()
    forgotten = link.session.request_token()
    link.session.forget_request(forgotten)
    events = link.feed(
        delivery(1, "answer", re=token),
        delivery(2, "late", re=token),
        delivery(3, "after a timeout", re=forgotten),
        delivery(4, "someone else's", re="their-token"),
    )
    replies = [e for e in events if type(e) is ReplyReceived]
    assert [(r.token, r.message.body) for r in replies] == [(token, "answer")]
    assert [m.body for m in events if type(m) is Message] == ["someone else's"]
    assert link.sent()[-1] == Ack(seq=4)  # dropped replies are acknowledged all the same


def test_answers_by_ref_leave_the_outbox_and_the_rest_passes_through_in_order() -> None:
    link = Link()
    link.connect(resumed=True)
    who = link.submit(lambda msg_id: Who(room="chat", id=msg_id))
    leave = link.submit(lambda msg_id: Leave(room="x", id=msg_id))
    joined = Presence(room="chat", name="bob", event="join")
    events = link.feed(
        encode_frame_of(Members(room="chat", names=["a", "b"], ref=who)),
        encode_frame_of(joined),
        refusal(leave, "not_member", "not a member of 'x'"),
        encode_frame_of(Error(code="bad_message", message="huh")),
        encode_frame_of(Bye(reason="server_shutdown")),
    )
    assert events == [
        Answered(who, ["a", "b"]),
        joined,
        Refused(leave, "not_member", "not a member of 'x'"),
        Error(code="bad_message", message="huh"),
        Bye(reason="server_shutdown"),
    ]
    assert len(link.session.outbox) == 0


def test_a_pong_passes_through_for_the_driver() -> None:
    link = Link()
    link.connect(resumed=True)
    assert link.conn is not None
    link.conn.ping(link.now)
    (ping,) = [m for m in link.sent() if type(m) is Ping]
    assert link.feed(encode_frame_of(Ping(id=7))) == []  # the server's ping: the core answers
    (pong,) = link.feed(encode_frame_of(Pong(id=ping.id)))
    assert type(pong) is PongReceived and pong.rtt == pytest.approx(0.02)  # two reads later


# -- flush --------------------------------------------------------------------------------------


def test_a_flush_waits_for_what_was_sent_before_it_only() -> None:
    link = Link()
    link.connect(resumed=True)
    assert link.session.flush() is None  # nothing unanswered: nothing to wait for
    for _ in range(3):
        link.submit()
    flush = link.session.flush()
    assert flush is not None and flush.total == 3
    link.submit()  # after the flush: not waited for
    assert link.feed(ack("1", "3", "4")) == [Acknowledged(["1", "3", "4"])]
    events = link.feed(ack("2"))
    assert events == [FlushCompleted(flush), Acknowledged(["2"])]
    assert flush.error() is None


def test_a_flush_reports_the_refusals_among_what_it_waited_for() -> None:
    link = Link()
    link.connect(resumed=True)
    for _ in range(10):
        link.submit()
    flush = link.session.flush()
    assert flush is not None
    events = link.feed(ack("1", "2", "3"), *(refusal(str(n)) for n in range(4, 11)))
    assert kinds(events) == ["Acknowledged", *["Refused"] * 6, "FlushCompleted", "Refused"]
    assert len(link.session.outbox) == 0  # refused requests leave it: a resend would fail too
    error = flush.error()
    assert error is not None
    assert error.code == "rate_limited"
    assert str(error) == "7 of 10 messages were refused: slow down (rate_limited)"
    assert error.ids == ("4", "5", "6", "7", "8", "9", "10")  # which ones, in order


def test_a_flush_names_the_most_frequent_refusal_and_counts_each() -> None:
    link = Link()
    link.connect(resumed=True)
    for _ in range(4):
        link.submit()
    flush = link.session.flush()
    assert flush is not None
    link.feed(refusal("1", "not_member"), refusal("2"), refusal("3"), ack("4"))
    error = flush.error()
    assert error is not None and error.code == "rate_limited"
    assert error.message == "3 of 4 messages were refused: 2 rate_limited, 1 not_member"
    assert error.ids == ("1", "2", "3")


def test_refusals_before_a_flush_was_asked_are_not_its_business() -> None:
    link = Link()
    link.connect(resumed=True)
    link.submit()
    link.submit()
    link.feed(refusal("1"))
    flush = link.session.flush()
    assert flush is not None and flush.total == 1
    assert link.feed(ack("2"))[0] == FlushCompleted(flush)
    assert flush.error() is None


def test_a_flush_completes_across_a_reconnect_once_the_resends_are_answered() -> None:
    link = Link()
    link.connect(resumed=True)
    link.submit()
    link.submit()
    flush = link.session.flush()
    link.connect(resumed=False, rooms=["chat"])  # the join (id 3) is not waited for
    assert [m.id for m in link.sent()] == ["3", "1", "2"]  # type: ignore[union-attr]
    assert link.feed(ack("3", "1")) == [Acknowledged(["3", "1"])]
    assert link.feed(ack("2"))[0] == FlushCompleted(flush)  # type: ignore[arg-type]


def test_a_forgotten_flush_never_completes() -> None:
    link = Link()
    link.connect(resumed=True)
    link.submit()
    flush = link.session.flush()
    assert flush is not None
    link.session.forget_flush(flush)
    assert link.feed(ack("1")) == [Acknowledged(["1"])]
    link.session.forget_flush(flush)  # twice is harmless (a timeout after completion)


# -- a property: the bookkeeping against a model -------------------------------------------------

steps = st.lists(
    st.one_of(
        st.just(("submit",)),
        st.just(("flush",)),
        st.tuples(st.just("answer"), st.integers(0, 30), st.booleans()),
        st.tuples(st.just("reconnect"), st.booleans()),
    ),
    max_size=60,
)


@given(steps)
def test_flushes_complete_exactly_when_what_they_waited_for_is_answered(steps: list[Any]) -> None:
    """Requests answered in any order, acked or refused, across reconnects: the outbox holds
    exactly the unanswered ones (resent in send order), and each flush completes once, with
    the last answer among those it waited for, counting the refusals among them."""
    session = ClientSession(max_outbox=1000, request_prefix=PREFIX)
    pending: list[str] = []  # the model: unanswered ids in send order
    waiting: list[tuple[Flush, set[str], list[int]]] = []  # flush, its ids, [refused]
    for step in steps:
        if step[0] == "submit":
            session.submit(publish())
            pending.append(session.last_id)
        elif step[0] == "flush":
            flush = session.flush()
            assert (flush is None) == (not pending)
            if flush is not None:
                waiting.append((flush, set(pending), [0]))
        elif step[0] == "answer" and pending:
            ref = pending.pop(step[1] % len(pending))
            refused = step[2]
            answer = Error(code="rate_limited", message="m", ref=ref) if refused else None
            events = session.events_received([MessageReceived(answer or ServerAck(ids=[ref]))])
            done = []
            for flush, ids, count in waiting:
                if ref in ids:
                    ids.discard(ref)
                    count[0] += refused
                    if not ids:
                        done.append(flush)
                        assert flush.refused == count[0]
                        assert (flush.error() is None) == (count[0] == 0)
            assert [e.flush for e in events if type(e) is FlushCompleted] == done
            waiting = [entry for entry in waiting if entry[1]]
        elif step[0] == "reconnect":
            frames = session.attach(resumed=step[1], rooms=[])
            decoder = FrameDecoder()
            resent = [decode_client(f) for f in decoder.feed(b"".join(frames))]
            assert [m.id for m in resent] == pending  # type: ignore[union-attr]
        assert len(session.outbox) == len(pending)


def test_the_outbox_is_full_by_bytes_before_it_is_full_by_count() -> None:
    session = ClientSession(max_outbox=1_000, max_outbox_bytes=1_000, request_prefix="rq-")
    body = msgspec.Raw(b'"' + b"x" * 300 + b'"')
    sent = 0
    while not session.outbox.full:
        session.submit(lambda msg_id: Publish(room="r", body=body, id=msg_id))
        sent += 1
    assert sent == 3 and session.outbox.bytes >= 1_000  # 3 frames of ~340 bytes, not 1,000
