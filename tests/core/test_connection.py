"""Connection state machines, joined in memory: handshake, errors, heartbeat, deadlines."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from securemsg.core.connection import (
    Client,
    Connection,
    ConnectionState,
    Event,
    FrameRejected,
    MessageReceived,
    PeerTimedOut,
    PongReceived,
    Server,
)
from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.core.messages import (
    Delivery,
    Error,
    Heartbeat,
    Hello,
    Join,
    Message,
    Ping,
    Pong,
    Publish,
    Welcome,
    decode_client,
    decode_server,
    encode,
    encode_frame_of,
)

INTERVAL = 10.0
TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 5.0
HELLO = Hello(version=2, name="alice")
WELCOME = Welcome(
    version=2,
    session="tok",
    name="alice",
    resumed=False,
    heartbeat=Heartbeat(interval=INTERVAL, timeout=TIMEOUT),
    max_frame=1024,
)
PUBLISH = Publish(room="chat", body=msgspec.Raw(b'"hi"'), id="p1")
OPEN = ConnectionState.OPEN
CLOSING = ConnectionState.CLOSING


class ConnectionPair:
    """A client and a server joined in memory; the test moves the bytes and the clock."""

    def __init__(self, *, server_max_frame: int = 1024) -> None:
        self.now = 0.0
        options: dict[str, Any] = {"heartbeat_interval": INTERVAL, "heartbeat_timeout": TIMEOUT}
        self.client = Client(now=0.0, **options)
        self.server = Server(
            now=0.0, handshake_timeout=HANDSHAKE_TIMEOUT, max_frame=server_max_frame, **options
        )

    def peer(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def deliver(self, sender: Connection, *, byte_by_byte: bool = False) -> list[Event]:
        """Move everything ``sender`` queued into its peer; return the peer's events."""
        data = b"".join(sender.data_to_send())
        receiver = self.peer(sender)
        if not byte_by_byte:
            return receiver.receive_data(data, self.now)
        events: list[Event] = []
        for index in range(len(data)):
            events += receiver.receive_data(data[index : index + 1], self.now)
        return events

    def send(self, sender: Connection, message: msgspec.Struct) -> list[Event]:
        sender.send(message)
        return self.deliver(sender)

    def handshake(self) -> ConnectionPair:
        self.client.hello(HELLO)
        assert self.deliver(self.client) == [MessageReceived(HELLO)]
        self.server.accept(WELCOME)
        assert self.deliver(self.server) == [MessageReceived(WELCOME)]
        assert (self.client.state, self.server.state) == (OPEN, OPEN)
        return self


def sent_by(conn: Connection) -> list[Any]:
    """Decode (and take) what ``conn`` queued for its peer."""
    decode: Callable[[bytes], Any] = decode_server if isinstance(conn, Server) else decode_client
    payloads = FrameDecoder().feed(b"".join(conn.data_to_send()))
    return [decode(payload) for payload in payloads]


def rejected(events: list[Event], code: str, *, fatal: bool) -> None:
    assert len(events) == 1
    event = events[-1]
    assert isinstance(event, FrameRejected)
    assert (event.error.code, event.fatal) == (code, fatal)


# -- handshake --------------------------------------------------------------------------------


def test_hello_then_welcome_opens_both_ends() -> None:
    pair = ConnectionPair()
    assert (pair.client.state, pair.server.state) == (ConnectionState.HANDSHAKE,) * 2
    pair.handshake()


def test_the_handshake_survives_any_split_of_the_bytes() -> None:
    pair = ConnectionPair()
    pair.client.hello(HELLO)
    assert pair.deliver(pair.client, byte_by_byte=True) == [MessageReceived(HELLO)]
    pair.server.accept(WELCOME)
    pair.server.send(PUBLISH_AS_MESSAGE)
    events = pair.deliver(pair.server, byte_by_byte=True)
    # The client decodes the body in the same pass: Message, not the server's Delivery.
    assert events == [MessageReceived(WELCOME), MessageReceived(AS_DELIVERED)]


PUBLISH_AS_MESSAGE = Delivery(room="chat", sender="bob", body=msgspec.Raw(b"1"), ts=1.0, seq=1)
AS_DELIVERED = Message(room="chat", sender="bob", body=1, time=1.0, seq=1)


def test_a_first_frame_that_is_not_hello_gets_bad_message_and_a_close() -> None:
    pair = ConnectionPair()
    events = pair.send(pair.client, Join(room="chat", id="j1"))
    rejected(events, "bad_message", fatal=True)
    assert pair.server.state is CLOSING
    (error,) = sent_by(pair.server)
    assert isinstance(error, Error)
    assert (error.code, error.ref) == ("bad_message", None)


def test_not_even_a_ping_may_come_before_hello() -> None:
    pair = ConnectionPair()
    rejected(pair.send(pair.client, Ping(id=1)), "bad_message", fatal=True)
    assert [type(m) for m in sent_by(pair.server)] == [Error]  # an error, not a pong


def test_any_rejected_frame_during_the_handshake_is_fatal() -> None:
    pair = ConnectionPair()
    events = pair.server.receive_data(encode_frame(b'{"type":"shout","id":"x"}'), 0.0)
    rejected(events, "unknown_type", fatal=True)
    assert pair.server.state is CLOSING


def test_frames_after_a_fatal_one_in_the_same_read_are_not_processed() -> None:
    pair = ConnectionPair()
    data = encode_frame_of(Join(room="a")) + encode_frame_of(HELLO)
    rejected(pair.server.receive_data(data, 0.0), "bad_message", fatal=True)


def test_the_client_refuses_a_first_frame_that_is_not_welcome_and_sends_no_error() -> None:
    pair = ConnectionPair()
    pair.client.hello(HELLO)
    pair.client.data_to_send()
    pair.server.send(PUBLISH_AS_MESSAGE)
    rejected(pair.deliver(pair.server), "bad_message", fatal=True)
    assert pair.client.state is CLOSING
    assert sent_by(pair.client) == []


def test_the_client_takes_an_error_in_place_of_welcome_as_a_message() -> None:
    pair = ConnectionPair()
    pair.client.hello(HELLO)
    pair.deliver(pair.client)
    pair.server.fail("unauthorized", "the token is missing or wrong")
    assert pair.server.state is CLOSING
    events = pair.deliver(pair.server)
    assert events == [
        MessageReceived(Error(code="unauthorized", message="the token is missing or wrong"))
    ]


def test_a_ping_pipelined_after_hello_is_answered_right_after_welcome() -> None:
    pair = ConnectionPair()
    pair.client.hello(HELLO)
    pair.client.send(Ping(id=7))
    pair.client.send(Join(room="chat"))
    events = pair.deliver(pair.client)
    assert events == [MessageReceived(HELLO), MessageReceived(Join(room="chat"))]
    assert pair.server.data_to_send() == []  # no pong before welcome
    pair.server.accept(WELCOME)
    assert sent_by(pair.server) == [WELCOME, Pong(id=7)]


def test_a_second_hello_is_bad_message_but_not_fatal() -> None:
    pair = ConnectionPair().handshake()
    rejected(pair.send(pair.client, HELLO), "bad_message", fatal=False)
    assert pair.server.state is OPEN


def test_no_hello_within_the_handshake_timeout_times_out() -> None:
    pair = ConnectionPair()
    assert pair.server.next_deadline() == HANDSHAKE_TIMEOUT
    assert pair.server.tick(HANDSHAKE_TIMEOUT - 0.01) == []
    assert not pair.server.has_data_to_send
    assert pair.server.tick(HANDSHAKE_TIMEOUT) == [
        PeerTimedOut("handshake_timeout", HANDSHAKE_TIMEOUT)
    ]
    assert pair.server.state is CLOSING
    assert pair.server.close_code == "handshake_timeout"
    assert [m.code for m in sent_by(pair.server)] == ["handshake_timeout"]


def test_a_hello_in_time_cancels_the_handshake_timeout() -> None:
    pair = ConnectionPair()
    pair.now = 4.0
    pair.handshake()
    assert pair.server.tick(HANDSHAKE_TIMEOUT + 1) == []
    assert pair.server.state is OPEN


# -- errors once open -------------------------------------------------------------------------


def test_an_unknown_type_is_answered_and_the_connection_stays_open() -> None:
    pair = ConnectionPair().handshake()
    data = encode_frame(b'{"type":"shout","id":"s1"}') + encode_frame_of(PUBLISH)
    events = pair.server.receive_data(data, 1.0)
    assert len(events) == 2
    assert isinstance(events[0], FrameRejected)
    assert (events[0].error.code, events[0].fatal) == ("unknown_type", False)
    assert events[1] == MessageReceived(PUBLISH)
    assert pair.server.state is OPEN
    (error,) = sent_by(pair.server)
    assert (error.code, error.ref) == ("unknown_type", "s1")


def test_a_bad_field_is_answered_and_the_connection_stays_open() -> None:
    pair = ConnectionPair().handshake()
    payload = encode({"type": "publish", "room": "a.*", "body": 1, "id": "p9"})
    rejected(pair.server.receive_data(encode_frame(payload), 1.0), "bad_message", fatal=False)
    assert pair.server.state is OPEN
    assert [(m.code, m.ref) for m in sent_by(pair.server)] == [("bad_message", "p9")]


def test_invalid_json_is_bad_frame_and_fatal() -> None:
    pair = ConnectionPair().handshake()
    rejected(pair.server.receive_data(encode_frame(b"{nope"), 1.0), "bad_frame", fatal=True)
    assert pair.server.state is CLOSING
    assert [m.code for m in sent_by(pair.server)] == ["bad_frame"]


def test_a_too_large_frame_is_fatal_and_the_frames_before_it_count() -> None:
    # A join: a publish could not fit 64 bytes with the headroom its delivery needs.
    pair = ConnectionPair(server_max_frame=64).handshake()
    join = Join(room="chat", id="j1")
    data = encode_frame_of(join) + struct.pack(">I", 65)
    events = pair.server.receive_data(data, 1.0)
    assert events[0] == MessageReceived(join)
    rejected(events[1:], "too_large", fatal=True)
    assert pair.server.state is CLOSING
    assert pair.server.close_code == "too_large"
    assert [m.code for m in sent_by(pair.server)] == ["too_large"]


def test_data_after_closing_is_ignored() -> None:
    pair = ConnectionPair().handshake()
    pair.server.receive_data(encode_frame(b"[]"), 1.0)
    pair.server.data_to_send()
    assert pair.server.state is CLOSING
    assert pair.server.receive_data(encode_frame_of(PUBLISH), 2.0) == []
    assert pair.server.receive_data(b"\x00\x00\x00\x00", 2.0) == []
    assert pair.server.tick(100.0) == []
    assert not pair.server.has_data_to_send


def test_a_client_that_gets_garbage_closes_without_answering() -> None:
    pair = ConnectionPair().handshake()
    rejected(pair.client.receive_data(b"\x00\x00\x00\x00", 1.0), "bad_frame", fatal=True)
    assert pair.client.state is CLOSING
    assert sent_by(pair.client) == []


def test_bye_closes_the_sending_end() -> None:
    pair = ConnectionPair().handshake()
    pair.server.send_bye("server_shutdown")
    assert pair.server.state is CLOSING
    events = pair.deliver(pair.server)
    assert [type(e.message).__name__ for e in events if isinstance(e, MessageReceived)] == ["Bye"]


def test_connection_lost_closes() -> None:
    pair = ConnectionPair().handshake()
    pair.client.connection_lost()
    assert pair.client.state is ConnectionState.CLOSED
    assert pair.client.receive_data(encode_frame_of(Ping(id=1)), 1.0) == []


# -- heartbeat --------------------------------------------------------------------------------


def test_a_ping_is_sent_after_an_interval_of_silence() -> None:
    pair = ConnectionPair().handshake()
    assert pair.server.tick(INTERVAL - 0.01) == []
    assert sent_by(pair.server) == []
    assert pair.server.tick(INTERVAL) == []
    assert sent_by(pair.server) == [Ping(id=1)]


def test_a_ping_is_echoed_with_its_id_and_the_round_trip_is_measured() -> None:
    pair = ConnectionPair().handshake()
    pair.now = INTERVAL
    pair.server.tick(pair.now)
    pair.now += 0.25
    assert pair.deliver(pair.server) == []  # the client answers by itself
    assert pair.client.data_to_send() == [encode_frame_of(Pong(id=1))]
    pair.client.send(Pong(id=1))
    pair.now += 0.25
    assert pair.deliver(pair.client) == [PongReceived(1, 0.5)]
    assert pair.server.rtt == 0.5


def test_a_pong_echoes_any_ping_id() -> None:
    pair = ConnectionPair().handshake()
    pair.send(pair.server, Ping(id=4_000_000_000))
    assert sent_by(pair.client) == [Pong(id=4_000_000_000)]


def test_a_pong_nobody_asked_for_is_ignored() -> None:
    pair = ConnectionPair().handshake()
    assert pair.send(pair.client, Pong(id=99)) == []
    assert pair.server.rtt is None


def test_ping_ids_count_up() -> None:
    pair = ConnectionPair().handshake()
    for n in range(1, 4):
        pair.now = n * INTERVAL
        pair.server.tick(pair.now)
        assert sent_by(pair.server) == [Ping(id=n)]
        pair.send(pair.client, Pong(id=n))


def test_only_the_latest_pings_are_remembered() -> None:
    pair = ConnectionPair().handshake()
    for n in range(1, 11):  # the first tick dates the welcome; then a ping per interval
        pair.now = n * INTERVAL
        pair.send(pair.client, Pong(id=0))  # alive, but answering none of the pings
        pair.server.tick(pair.now)
    assert [m.id for m in sent_by(pair.server)] == list(range(1, 10))
    assert pair.send(pair.client, Pong(id=1)) == []  # forgotten
    assert pair.send(pair.client, Pong(id=9)) != []


def test_a_peer_silent_for_the_timeout_is_dead_even_while_we_keep_sending() -> None:
    pair = ConnectionPair().handshake()
    client = pair.client
    pings = 0
    for second in range(1, int(TIMEOUT)):
        client.send(PUBLISH)  # into a black hole: nothing ever comes back
        assert client.tick(float(second)) == []
        pings += sum(isinstance(m, Ping) for m in sent_by(client))
    assert client.state is OPEN
    assert pings == 2  # at 10 s and 20 s, despite the steady sending
    assert client.tick(TIMEOUT) == [PeerTimedOut("heartbeat_timeout", TIMEOUT)]
    assert client.state is CLOSING
    assert client.close_code == "heartbeat_timeout"
    assert sent_by(client) == []  # the client does not send error frames


def test_the_server_tells_a_dead_peer_why_it_closes() -> None:
    pair = ConnectionPair().handshake()
    assert pair.server.tick(TIMEOUT) == [PeerTimedOut("heartbeat_timeout", TIMEOUT)]
    assert [m.code for m in sent_by(pair.server)] == ["heartbeat_timeout"]


def test_any_valid_frame_resets_the_silence() -> None:
    pair = ConnectionPair().handshake()
    pair.now = 25.0
    pair.send(pair.client, PUBLISH)
    assert pair.server.tick(TIMEOUT) == []
    assert pair.server.tick(25.0 + TIMEOUT - 0.01) == []
    assert pair.server.tick(25.0 + TIMEOUT) != []


def test_a_pong_resets_the_silence() -> None:
    pair = ConnectionPair().handshake()
    pair.now = 29.0
    pair.send(pair.client, Pong(id=12345))
    assert pair.server.tick(TIMEOUT) == []
    assert pair.server.state is OPEN


def test_set_heartbeat_takes_the_servers_values() -> None:
    pair = ConnectionPair().handshake()
    pair.client.set_heartbeat(interval=1.0, timeout=3.0)
    pair.client.tick(1.0)
    assert sent_by(pair.client) == [Ping(id=1)]
    assert pair.client.tick(3.0) == [PeerTimedOut("heartbeat_timeout", 3.0)]


# -- deadlines --------------------------------------------------------------------------------


def test_a_connection_driven_only_by_its_deadlines_finds_a_dead_peer_on_time() -> None:
    pair = ConnectionPair().handshake()
    server = pair.server
    wakeups = 0
    events: list[Event] = []
    while not events:
        wakeups += 1
        now = server.next_deadline()
        events = server.tick(now)
        server.data_to_send()
    assert events == [PeerTimedOut("heartbeat_timeout", TIMEOUT)]
    assert wakeups <= 2 * TIMEOUT / INTERVAL + 1


actions = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=2 * INTERVAL),
        st.sampled_from(["client_sends", "server_sends", "to_server", "to_client", "none"]),
    ),
    max_size=25,
)


@given(actions)
@settings(max_examples=150)
def test_nothing_happens_before_next_deadline_and_it_is_always_ahead_after_a_tick(
    steps: list[tuple[float, str]],
) -> None:
    pair = ConnectionPair().handshake()
    for delay, action in steps:
        pair.now += delay
        if action == "client_sends":
            pair.client.send(PUBLISH)
        elif action == "server_sends":
            pair.server.send(PUBLISH_AS_MESSAGE)
        elif action == "to_server":
            pair.deliver(pair.client)
        elif action == "to_client":
            pair.deliver(pair.server)
        for conn in (pair.client, pair.server):
            if conn.state is not OPEN:
                continue
            early = pair.now < conn.next_deadline()
            frames_out = conn.frames_out
            events = conn.tick(pair.now)
            if early:
                assert events == []
                assert conn.frames_out == frames_out
            if conn.state is OPEN:
                assert conn.next_deadline() > pair.now
