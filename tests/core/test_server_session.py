"""The server's session rules, sans-I/O: client bytes into the real connection core, its events
into a :class:`ServerSession`, and what comes out (events, held acks, replayed frames), with a
fake ``now`` and a small in-memory router (rooms and names, no deliveries)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import msgspec
import pytest

from securemsg.core.connection import FrameRejected, MessageReceived, Server
from securemsg.core.delivery import message_prefix
from securemsg.core.frames import FrameDecoder
from securemsg.core.messages import (
    ACK_BATCH,
    ACK_DELAY,
    PROTOCOL_VERSION,
    Ack,
    Delivery,
    Direct,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Join,
    Leave,
    Members,
    Publish,
    Welcome,
    Who,
    decode_server,
    encode,
    encode_frame_of,
)
from securemsg.core.rooms import RoomRegistry
from securemsg.core.server_session import (
    ACK_LATER,
    Answered,
    HelloPolicy,
    Joined,
    Left,
    Request,
    RequestRefused,
    ServerSession,
    SessionEvent,
)
from securemsg.errors import ProtocolError

BODY = msgspec.Raw(b'"hi"')

Session = ServerSession[Server]


@dataclass
class Router:
    """Rooms and names of one server, recording what was carried out."""

    rooms: RoomRegistry[Session] = field(default_factory=RoomRegistry)
    names: set[str] = field(default_factory=set)
    carried_out: list[str] = field(default_factory=list)

    def publish(self, session: Session, msg: Publish, ts: float) -> None:
        self.carried_out.append(f"publish {msg.id}")

    def direct(self, session: Session, msg: Direct, ts: float) -> bool:
        if msg.to not in self.names:
            return False
        self.carried_out.append(f"direct {msg.id}")
        return True

    def join(self, session: Session, room_filter: str, *, ref: str | None = None) -> None:
        self.carried_out.append(f"join {room_filter}")
        self.rooms.join(session, room_filter)

    def leave(self, session: Session, room_filter: str, *, ref: str | None = None) -> int:
        if not self.rooms.leave(session, room_filter):
            return False
        self.carried_out.append(f"leave {room_filter}")
        return True

    def subscription_count(self, session: Session) -> int:
        return self.rooms.subscription_count(session)

    def subscriptions(self, session: Session) -> Collection[str]:
        return self.rooms.filters_of(session)

    def who(self, room_filter: str, ref: str | None, session: object = None) -> bytes:
        self.carried_out.append(f"who {room_filter}")
        names = sorted(member.name for member in self.rooms.members(room_filter))
        return encode_frame_of(Members(room=room_filter, names=names, ref=ref))


def new_session(
    *, rate: float = 0.0, max_pending: int = 100, max_subscriptions: int = 1000
) -> Session:
    return ServerSession(
        sid="s1",
        name="alice",
        token="t",
        max_pending=max_pending,
        dedup_window=100,
        rate=rate,
        max_subscriptions=max_subscriptions,
    )


class Link:
    """One connection of ``session``: a real :class:`Server` core fed with client bytes."""

    def __init__(self, session: Session, router: Router, *, now: float = 0.0) -> None:
        self.session = session
        self.router = router
        self.now = now
        self.conn = Server(now=now)
        [hello] = self.conn.receive_data(frames(Hello(version=2, name="alice")), now)
        assert isinstance(hello, MessageReceived)
        heartbeat = Heartbeat(interval=10.0, timeout=30.0)
        self.conn.accept(
            Welcome(version=2, session="t", name="alice", resumed=False, heartbeat=heartbeat,
                    max_frame=1 << 20)
        )  # fmt: skip
        session.attach(self.conn, now)
        self.conn.data_to_send()

    def send(self, *messages: msgspec.Struct, data: bytes | None = None) -> list[SessionEvent]:
        """The client's frames arrive in one read; what the session made of them."""
        found: list[SessionEvent] = []
        for event in self.conn.receive_data(data or frames(*messages), self.now):
            assert isinstance(event, MessageReceived), event
            message = event.message
            assert isinstance(message, Join | Leave | Publish | Direct | Who | Ack)
            result = self.session.receive(message, now=self.now, ts=1.0, router=self.router)
            if result is not None:
                found.append(result)
        return found

    def acks(self) -> list[str]:
        """The held acks, taken now (as the driver does when they are due)."""
        acks = self.session.take_acks(self.conn)
        return [] if acks is None else acks.ids

    def cut(self) -> None:
        self.conn.connection_lost()
        assert self.session.detach(self.conn, expires_at=self.now + 60.0)


def frames(*messages: msgspec.Struct) -> bytes:
    return b"".join(encode_frame_of(message) for message in messages)


def decoded(frame: bytes) -> object:
    [payload] = FrameDecoder().feed(frame)
    return decode_server(payload)


# -- the bug of issue 10: a resent join was carried out again ---------------------------------


def test_a_join_and_leave_resent_after_a_cut_leave_the_session_out_of_the_room() -> None:
    router = Router()
    session = new_session()
    link = Link(session, router)
    link.send(Join(room="chat", id="1"), Leave(room="chat", id="2"))
    link.cut()  # before the acks went out: the client resends both, with the same ids
    link = Link(session, router, now=1.0)
    events = link.send(Join(room="chat", id="1"), Leave(room="chat", id="2"))
    assert router.rooms.filters_of(session) == frozenset()
    assert events == []  # neither carried out again (nor logged as joined or left)
    assert router.carried_out == ["join chat", "leave chat"]
    assert link.acks() == ["1", "2"]


ACKED_REQUESTS = [
    Publish(room="chat", body=BODY, id="7"),
    Direct(to="bob", body=BODY, id="7"),
    Join(room="chat", id="7"),
    Leave(room="chat", id="7"),
]


def test_the_dedup_tests_cover_every_request_kind() -> None:
    tested = {type(request) for request in ACKED_REQUESTS} | {Who}
    assert tested == set(Request.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "request_", ACKED_REQUESTS, ids=lambda request: type(request).__name__.lower()
)
def test_a_repeated_id_is_acknowledged_again_and_not_carried_out_twice(request_: Request) -> None:
    router = Router(names={"bob"})
    session = new_session()
    if isinstance(request_, Leave):
        router.rooms.join(session, "chat")
    link = Link(session, router)
    link.send(request_)
    assert link.acks() == ["7"]
    assert link.send(request_) == []
    assert link.acks() == ["7"]
    assert len(router.carried_out) == 1


def test_a_repeated_who_is_answered_again() -> None:
    router = Router()
    session = new_session()
    link = Link(session, router)
    first = link.send(Join(room="chat", id="1"), Who(room="chat", id="2"))
    again = link.send(Who(room="chat", id="2"))
    assert first[1] == again[0] == Answered(frames(Members(room="chat", names=["alice"], ref="2")))
    assert link.acks() == ["1"]  # a who is answered by its members frame, not acked


def test_requests_without_an_id_are_carried_out_every_time() -> None:
    router = Router()
    session = new_session()
    link = Link(session, router)
    link.send(*[Publish(room="chat", body=BODY)] * 2)
    assert router.carried_out == ["publish None", "publish None"]
    assert link.acks() == []


def test_a_direct_to_nobody_is_refused_again_when_resent_and_a_retry_is_carried_out() -> None:
    router = Router()
    session = new_session()
    link = Link(session, router)
    [refused] = link.send(Direct(to="bob", body=BODY, id="1"))
    assert refused == RequestRefused(
        Error(code=ErrorCode.NO_SUCH_USER, message="no user named 'bob'", ref="1")
    )
    router.names.add("bob")
    # The same id is a resend (its refusal was lost in a cut): the same answer, not carried
    # out after whatever the client sent since. A retry is a new request, with a new id.
    assert link.send(Direct(to="bob", body=BODY, id="1")) == [refused]
    assert link.send(Direct(to="bob", body=BODY, id="2")) == []
    assert router.carried_out == ["direct 2"]
    assert link.acks() == ["2"]


def test_a_refused_leave_resent_after_the_join_that_followed_it_does_not_undo_it() -> None:
    router = Router()
    session = new_session()
    link = Link(session, router)
    [refused] = link.send(Leave(room="chat", id="1"))
    assert isinstance(refused, RequestRefused) and refused.error.code == ErrorCode.NOT_MEMBER
    assert refused.error.ref == "1"
    assert link.send(Join(room="chat", id="2"), Leave(room="chat", id="1")) == [
        Joined("chat"),
        refused,
    ]
    assert link.acks() == ["2"]


def test_a_resend_is_not_charged_to_the_rate_limit() -> None:
    router = Router()
    session = new_session(rate=2)
    link = Link(session, router)
    assert link.send(*(Publish(room="chat", body=BODY, id=str(n)) for n in (1, 2))) == []
    assert link.send(Publish(room="chat", body=BODY, id="1")) == []  # a resend: acked again
    [limited] = link.send(Publish(room="chat", body=BODY, id="3"))  # new: the bucket is empty
    assert isinstance(limited, RequestRefused) and limited.error.code == "rate_limited"
    assert link.send(Publish(room="chat", body=BODY, id="3")) == [limited]  # same answer


# -- the rate limit ---------------------------------------------------------------------------


def test_the_rate_limit_refuses_past_the_burst_and_refills_with_time() -> None:
    router = Router()
    session = new_session(rate=3)
    link = Link(session, router)
    events = link.send(*[Publish(room="chat", body=BODY, id=str(i)) for i in range(5)])
    assert [event.error.ref for event in events] == ["3", "4"]  # type: ignore[union-attr]
    assert {event.error.code for event in events} == {ErrorCode.RATE_LIMITED}  # type: ignore[union-attr]
    assert link.acks() == ["0", "1", "2"]
    link.now += 1 / 3  # one token back; retries are new requests, with new ids
    assert link.send(*[Publish(room="chat", body=BODY, id=str(i)) for i in (5, 6)]) == [
        RequestRefused(
            Error(code=ErrorCode.RATE_LIMITED, message="message rate limit exceeded; dropped",
                  ref="6")
        )
    ]  # fmt: skip
    assert link.acks() == ["5"]


def test_a_rate_below_one_a_second_still_lets_one_request_through() -> None:
    link = Link(new_session(rate=0.1), Router())
    events = link.send(*[Join(room="chat", id=str(i)) for i in range(2)])
    assert [type(event) for event in events] == [Joined, RequestRefused]


def test_a_new_connection_starts_with_a_full_bucket() -> None:
    router = Router()
    session = new_session(rate=1)
    link = Link(session, router)
    assert link.send(Join(room="a", id="1")) == [Joined("a")]
    link.cut()
    link = Link(session, router, now=0.001)
    assert link.send(Join(room="b", id="2")) == [Joined("b")]


# -- held acks --------------------------------------------------------------------------------


def test_acks_are_held_until_due_or_until_another_frame_goes_out() -> None:
    session = new_session()
    link = Link(session, Router(), now=5.0)
    assert session.ack_due_at is None
    link.send(Publish(room="chat", body=BODY, id="1"))
    assert session.ack_due_at == 5.0 + ACK_DELAY
    link.now += 0.001
    link.send(Publish(room="chat", body=BODY, id="2"))
    assert session.ack_due_at == 5.0 + ACK_DELAY  # the first held ack sets the deadline
    assert session.acks_to_send(link.conn, sending=False) is None
    acks = session.acks_to_send(link.conn, sending=True)
    assert acks is not None and acks.ids == ["1", "2"]
    assert session.ack_due_at is None and link.acks() == []


def test_a_full_batch_of_acks_goes_out_at_once() -> None:
    session = new_session(max_pending=10)
    link = Link(session, Router())
    link.send(*[Publish(room="chat", body=BODY, id=str(i)) for i in range(ACK_BATCH - 1)])
    assert session.acks_to_send(link.conn, sending=False) is None
    link.send(Publish(room="chat", body=BODY, id="last"))
    acks = session.acks_to_send(link.conn, sending=False)
    assert acks is not None and len(acks.ids) == ACK_BATCH


def test_held_acks_die_with_their_connection_and_belong_to_the_attached_one() -> None:
    router = Router()
    session = new_session()
    old = Link(session, router)
    old.send(Publish(room="chat", body=BODY, id="1"))
    old.cut()
    assert session.ack_due_at is None
    new = Link(session, router, now=1.0)
    new.send(Publish(room="chat", body=BODY, id="2"))
    assert old.acks() == []  # a taken-over connection takes nothing from its successor
    assert not session.detach(old.conn, expires_at=99.0)  # nor is it detached by it
    assert session.link is new.conn and session.expires_at is None
    assert new.acks() == ["2"]


# -- delivery: cumulative acks and replay -----------------------------------------------------


def test_a_client_ack_trims_the_delivery_log_and_a_bad_one_is_rejected() -> None:
    session = new_session()
    link = Link(session, Router())
    prefix = message_prefix(encode(Delivery(room="chat", sender="bob", body=BODY, ts=1.0, seq=0)))
    for _ in range(3):
        session.delivery.append(prefix)
    assert link.send(Ack(seq=2)) == []
    assert (session.delivery.acked, len(session.delivery)) == (2, 1)
    [rejected] = link.send(Ack(seq=9))
    assert isinstance(rejected, FrameRejected) and not rejected.fatal
    assert rejected.error.code == "bad_message"


def test_replay_after_last_seq_gives_whole_numbered_frames() -> None:
    session = new_session()
    delivery = Delivery(room="chat", sender="bob", body=BODY, ts=1.0, seq=0)
    for _ in range(3):
        session.delivery.append(message_prefix(encode(delivery)))
    replayed = [decoded(frame) for frame in session.replay(1)]
    assert [message.seq for message in replayed] == [2, 3]  # type: ignore[attr-defined]
    assert session.delivery.acked == 1


# -- the hello policy -------------------------------------------------------------------------


def refusal(policy: HelloPolicy, hello: Hello, identity: str | None = None) -> tuple[str, str]:
    with pytest.raises(ProtocolError) as info:
        policy.admit(hello, identity=identity)
    return info.value.code, info.value.message


def test_the_hello_policy_names_the_session() -> None:
    assert HelloPolicy().admit(Hello(version=PROTOCOL_VERSION, name="alice"), identity=None) == (
        "alice"
    )


def test_the_hello_policy_refuses_another_version_and_a_missing_name() -> None:
    assert refusal(HelloPolicy(), Hello(version=1, name="alice"))[0] == "unsupported_version"
    assert refusal(HelloPolicy(), Hello(version=PROTOCOL_VERSION)) == (
        "bad_message",
        "'hello' needs a 'name'",
    )


def test_the_hello_policy_checks_the_shared_token() -> None:
    policy = HelloPolicy(token=b"sesame")
    assert "sesame" not in repr(policy)
    hello = Hello(version=PROTOCOL_VERSION, name="alice")
    assert refusal(policy, hello)[0] == "unauthorized"
    assert refusal(policy, Hello(version=PROTOCOL_VERSION, name="alice", token="x"))[0] == (
        "unauthorized"
    )
    assert policy.admit(Hello(version=2, name="alice", token="sesame"), identity=None) == "alice"


def test_under_mutual_tls_the_certificate_names_the_session() -> None:
    policy = HelloPolicy(require_identity=True)
    assert policy.admit(Hello(version=PROTOCOL_VERSION), identity="carol") == "carol"
    assert policy.admit(Hello(version=PROTOCOL_VERSION, name="carol"), identity="carol") == "carol"
    assert refusal(policy, Hello(version=PROTOCOL_VERSION, name="mallory"), "carol") == (
        "unauthorized",
        "the name 'mallory' differs from the certificate's 'carol'",
    )
    assert refusal(policy, Hello(version=PROTOCOL_VERSION, name="carol"))[0] == "unauthorized"


def test_a_session_never_shows_its_token() -> None:
    session = ServerSession(sid="s1", name="a", token="secret", max_pending=1, dedup_window=1)
    assert "secret" not in repr(session)


def test_bytes_split_anywhere_give_the_same_answers() -> None:
    messages = [Join(room="chat", id="1"), Who(room="chat", id="2"), Leave(room="chat", id="3")]
    whole = Link(new_session(), Router())
    expected = whole.send(*messages)
    byte_by_byte = Link(new_session(), Router())
    data = frames(*messages)
    found: list[SessionEvent] = []
    for index in range(len(data)):
        found += byte_by_byte.send(data=data[index : index + 1])
    assert found == expected
    assert byte_by_byte.acks() == whole.acks() == ["1", "3"]


# -- max_subscriptions (issue 11) ---------------------------------------------------------------


def test_a_join_past_max_subscriptions_is_refused_and_the_session_goes_on() -> None:
    router = Router()
    link = Link(new_session(max_subscriptions=3), router)
    assert link.send(Join(room="a", id="1"), Join(room="b.*", id="2"), Join(room="c", id="3")) == [
        Joined("a"),
        Joined("b.*"),
        Joined("c"),
    ]
    [refused] = link.send(Join(room="d", id="4"))
    assert isinstance(refused, RequestRefused)
    assert refused.error.code == "too_many_rooms"
    assert refused.error.ref == "4"
    assert "3" in refused.error.message
    assert router.rooms.subscription_count(link.session) == 3
    # Joining a room again at the limit changes nothing and is not refused.
    assert link.send(Join(room="a", id="5")) == [Joined("a")]
    # A leave makes room; a retry (a new request, with a new id) is carried out, while a
    # resend of the refused one is refused again, the same way.
    link.send(Leave(room="c", id="6"))
    assert link.send(Join(room="d", id="4")) == [refused]
    assert link.send(Join(room="d", id="7")) == [Joined("d")]


@dataclass
class LaterRouter(Router):
    """A cluster node's router: publishes and directs are acknowledged once stored, joins
    and leaves once recorded."""

    def publish(self, session: Session, msg: Publish, ts: float) -> int:  # type: ignore[override]
        super().publish(session, msg, ts)
        return ACK_LATER

    def direct(self, session: Session, msg: Direct, ts: float) -> int:
        return ACK_LATER if super().direct(session, msg, ts) else False

    def join(  # type: ignore[override]
        self, session: Session, room_filter: str, *, ref: str | None = None
    ) -> int:
        super().join(session, room_filter)
        return ACK_LATER

    def leave(self, session: Session, room_filter: str, *, ref: str | None = None) -> int:
        return ACK_LATER if super().leave(session, room_filter) else False


def test_a_router_may_acknowledge_publishes_directs_joins_and_leaves_later() -> None:
    router = LaterRouter(names={"bob"})
    session = new_session()
    link = Link(session, router)
    no_carol = Error(code=ErrorCode.NO_SUCH_USER, message="no user named 'carol'", ref="3")
    assert link.send(
        Publish(room="r", body=BODY, id="1"),
        Direct(to="bob", body=BODY, id="2"),
        Direct(to="carol", body=BODY, id="3"),
        Join(room="r", id="4"),
    ) == [RequestRefused(no_carol), Joined("r")]
    assert link.acks() == []  # none is stored yet
    session.hold_ack("2", 0.0)  # stored
    session.hold_ack("4", 0.0)
    assert link.acks() == ["2", "4"]
    assert router.carried_out == ["publish 1", "direct 2", "join r"]
    # A leave too; one of a room the session is not in is still refused at once.
    not_member = Error(code=ErrorCode.NOT_MEMBER, message="not a member of 'x'", ref="6")
    assert link.send(Leave(room="r", id="5"), Leave(room="x", id="6")) == [
        Left("r"),
        RequestRefused(not_member),
    ]
    assert link.acks() == []
    session.hold_ack("5", 0.0)
    assert link.acks() == ["5"]
