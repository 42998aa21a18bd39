"""The client's parts that need no server: failure classification, configuration, and one
connection plus its mailbox driven in memory (server frames in, client frames out)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterable
from typing import Any

import msgspec
import pytest

from securemsg.client.client import Client, connect, make_config
from securemsg.client.connection import (
    ClientConnection,
    HandshakeClosedError,
    connect_error,
    should_retry,
)
from securemsg.client.mailbox import MAX_RECEIVED, Mailbox
from securemsg.client.types import ClientState, Closed, Message, Presence
from securemsg.config import ClientConfig
from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.core.messages import (
    Ack,
    ClientMessage,
    Error,
    Heartbeat,
    Hello,
    Members,
    Ping,
    Publish,
    ServerAck,
    Welcome,
    decode_client,
    encode_frame_of,
)
from securemsg.core.messages import Delivery as WireMessage
from securemsg.core.messages import Presence as WirePresence
from securemsg.errors import (
    AuthError,
    ClosedError,
    ConfigError,
    ConnectError,
    RejectedError,
    TimeoutError,
    TLSError,
)

CONFIG = ClientConfig(host="example.test", port=7443)


def welcome(resumed: bool = False, interval: float = 10.0, timeout: float = 30.0) -> bytes:
    heartbeat = Heartbeat(interval=interval, timeout=timeout)
    return encode_frame_of(
        Welcome(
            version=2, session="tok", name="alice", resumed=resumed, heartbeat=heartbeat,
            max_frame=1024 * 1024,
        )
    )  # fmt: skip


def message(seq: int, body: str = "hi", **fields: Any) -> bytes:
    fields.setdefault("room", "chat")
    raw = msgspec.Raw(msgspec.json.encode(body))
    return encode_frame_of(WireMessage(sender="bob", body=raw, ts=1.0, seq=seq, **fields))


class MemoryTransport(asyncio.Transport):
    """An in-memory transport: records what the client writes, reports closes like asyncio."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._protocol = protocol
        self.writes: list[list[bytes]] = []
        self.closing = False
        self.aborted = False
        self.paused = False

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.writes.append([bytes(data) for data in list_of_data])

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append([bytes(data)])

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._closed()

    def abort(self) -> None:
        self.aborted = True
        self._closed()

    def _closed(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def sent(self) -> list[ClientMessage]:
        decoder = FrameDecoder()
        return [decode_client(f) for batch in self.writes for f in decoder.feed(b"".join(batch))]


class Pair:
    """A ClientConnection on a MemoryTransport, welcomed and attached to a Mailbox."""

    def __init__(self, *, max_outbox: int = 100) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn = ClientConnection(self.loop, Hello(version=2, name="alice"))
        self.transport = MemoryTransport(self.conn)
        self.mailbox = Mailbox(max_outbox=max_outbox, log=_NullLog())
        self.conn.connection_made(self.transport)

    def open(
        self, data: bytes = b"", *, resumed: bool = True, rooms: list[str] | None = None
    ) -> None:
        self.conn.data_received(welcome(resumed) + data)
        assert self.conn.welcomed.done()
        self.mailbox.attach(self.conn, resumed=resumed, rooms=rooms or [])
        self.conn.attach(self.mailbox, interval=10.0, timeout=30.0)

    def feed(self, *frames: bytes) -> None:
        self.conn.data_received(b"".join(frames))

    def sent(self, kind: type | None = None) -> list[Any]:
        found = self.transport.sent()
        return [m for m in found if kind is None or type(m) is kind]


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# -- failure classification ------------------------------------------------------------------


def test_a_refused_connection_is_a_connect_error_that_names_the_server() -> None:
    error = connect_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), CONFIG)
    assert type(error) is ConnectError
    assert "example.test:7443" in str(error) and "refused" in str(error)


def test_every_address_refused_reads_as_refused_too() -> None:
    exc = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 7443, 0, 0), "
                  "[Errno 111] Connect call failed ('127.0.0.1', 7443)")  # fmt: skip
    assert "connection refused" in str(connect_error(exc, CONFIG))


def test_a_time_out_is_a_connect_error_that_says_what_it_covered() -> None:
    error = connect_error(TimeoutError(), CONFIG)
    assert type(error) is ConnectError
    assert "within 10 s" in str(error) and "example.test:7443" in str(error)


@pytest.mark.parametrize("code", ["unauthorized", "name_taken"])
def test_an_identity_refusal_is_an_auth_error_with_its_code(code: str) -> None:
    error = connect_error(RejectedError(code, "no"), CONFIG)
    assert isinstance(error, AuthError) and error.code == code


def test_other_refusals_of_the_hello_are_connect_errors() -> None:
    error = connect_error(RejectedError("unsupported_version", "too old"), CONFIG)
    assert type(error) is ConnectError and "too old" in str(error)


def test_eof_before_welcome_under_mutual_tls_blames_the_client_certificate() -> None:
    config = ClientConfig(host="example.test", cert="me.pem", key="me.key")
    error = connect_error(HandshakeClosedError(), config)
    assert isinstance(error, TLSError) and error.check == "client_certificate"
    assert "before welcome" in str(error) and "--cert" in str(error)


def test_eof_before_welcome_without_a_certificate_hints_at_one() -> None:
    error = connect_error(HandshakeClosedError(), CONFIG)
    assert type(error) is ConnectError and "--cert" in str(error)


def test_a_certificate_failure_is_a_tls_error_even_though_it_is_an_oserror() -> None:
    import ssl

    exc = ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get local issuer")
    exc.verify_code = 20
    exc.verify_message = "unable to get local issuer certificate"
    assert isinstance(exc, OSError)
    assert isinstance(connect_error(exc, CONFIG), TLSError)


@pytest.mark.parametrize(
    ("error", "first", "later"),
    [
        (ConnectError("refused"), True, True),
        (TLSError("bad ca", check="unknown_authority"), False, True),
        (AuthError("who?", code="unauthorized"), False, True),
        (ConfigError("missing key file"), False, True),
    ],
)
def test_retry_classification(error: Exception, first: bool, later: bool) -> None:
    assert should_retry(error, welcomed=False) is first  # type: ignore[arg-type]
    assert should_retry(error, welcomed=True) is later  # type: ignore[arg-type]


# -- configuration ---------------------------------------------------------------------------


def test_keyword_arguments_override_the_config() -> None:
    base = ClientConfig(host="a.test", port=1000, reconnect_base=2.0, reconnect_cap=20.0)
    config = make_config(base, {"port": 2000, "max_outbox": 5, "name": None})
    assert (config.host, config.port, config.max_outbox) == ("a.test", 2000, 5)
    assert config.reconnect_base == 2.0


def test_connect_refuses_an_unknown_option_by_name() -> None:
    with pytest.raises(TypeError, match="reconect_base"):
        connect("localhost", reconect_base=1.0)


def test_connect_refuses_a_bad_value_with_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_outbox"):
        connect("localhost", max_outbox=0)


def test_connect_defaults_to_localhost_7443() -> None:
    config = connect().config
    assert (config.host, config.port) == ("localhost", 7443)


def test_messages_are_immutable() -> None:
    received = Message(room="r", sender="s", to=None, body=[1], seq=1, time=0.0)
    with pytest.raises(AttributeError):
        received.body = 2  # type: ignore[misc]


# -- one connection and its mailbox, in memory -----------------------------------------------


async def test_nothing_is_delivered_before_welcome_and_a_refusal_fails_the_handshake() -> None:
    pair = Pair()
    assert pair.sent(Hello)
    pair.feed(encode_frame_of(Error(code="name_taken", message="in use")))
    with pytest.raises(RejectedError) as caught:
        await pair.conn.welcomed
    assert caught.value.code == "name_taken"
    assert pair.transport.aborted


async def test_eof_before_welcome_fails_the_handshake_as_closed() -> None:
    pair = Pair()
    pair.conn.connection_lost(None)
    with pytest.raises(HandshakeClosedError):
        await pair.conn.welcomed


async def test_messages_that_arrive_with_welcome_wait_for_the_mailbox() -> None:
    pair = Pair()
    pair.mailbox.session.inbox.last_seq = 7  # from an earlier session the server forgot
    pair.open(message(1) + message(2), resumed=False)
    first = await pair.mailbox.receive(1)
    assert (first.seq, first.body) == (1, "hi")
    assert (await pair.mailbox.receive(1)).seq == 2


async def test_duplicates_are_dropped_and_nothing_is_acknowledged_before_it_is_taken() -> None:
    pair = Pair()
    pair.open()
    pair.feed(message(1), message(2), message(2), message(3))
    pair.feed(message(3))
    await settle()
    assert pair.sent(Ack) == []  # received is not delivered to the application
    assert [(await pair.mailbox.receive(1)).seq for _ in range(3)] == [1, 2, 3]
    with pytest.raises(TimeoutError):
        await pair.mailbox.receive(0.01)
    assert [m.seq for m in pair.sent(Ack)] == [3]


async def test_what_is_taken_in_one_loop_iteration_is_acknowledged_once_with_the_reply() -> None:
    pair = Pair()
    pair.open()
    pair.feed(*(message(seq) for seq in range(1, 6)))
    await settle()
    writes = len(pair.transport.writes)
    for _ in range(3):
        taken = await pair.mailbox.receive(1)
    assert taken.seq == 3
    pair.mailbox.submit(lambda i: Publish(room="r", body=msgspec.Raw(b"1"), id=i))
    await settle()
    assert len(pair.transport.writes) == writes + 1  # ack and publish in one write
    # 3 is in hand until the application asks for more; 4 and 5 wait, unacknowledged.
    assert [m.seq for m in pair.sent(Ack)] == [2]


async def test_a_reply_and_a_skipped_message_count_as_taken_but_not_past_a_waiting_one() -> None:
    pair = Pair()
    pair.open()
    token, reply = pair.mailbox.request_token()
    pair.feed(message(1, "answer", room=None, to="alice", re=token))
    await settle()
    assert (await reply).body == "answer"
    assert [m.seq for m in pair.sent(Ack)] == [1]  # the reply was taken on arrival
    undecodable = WireMessage(sender="bob", body=msgspec.Raw(b"1e400"), ts=1.0, seq=4)
    pair.feed(message(2), message(3, "late", re=token), encode_frame_of(undecodable))
    await settle()
    assert [m.seq for m in pair.sent(Ack)] == [1]  # 2 waits for the application: 3, 4 too
    assert (await pair.mailbox.receive(1)).seq == 2
    await settle()
    assert [m.seq for m in pair.sent(Ack)] == [1]  # 2 is in hand
    assert pair.mailbox.take() is None  # the application asks for more: done with 2
    await settle()
    assert [m.seq for m in pair.sent(Ack)] == [1, 4]


async def test_frames_sent_in_one_loop_iteration_go_out_in_one_write() -> None:
    pair = Pair(max_outbox=1000)
    pair.open()
    await settle()
    writes = len(pair.transport.writes)
    for n in range(500):
        await pair.mailbox.send(
            lambda i, n=n: Publish(room="r", body=msgspec.Raw(b"%d" % n), id=i), False, None, "p"
        )  # type: ignore[misc]
    await settle()
    assert len(pair.transport.writes) == writes + 1
    assert len(pair.sent(Publish)) == 500


async def test_a_reply_resolves_its_request_and_never_reaches_receive() -> None:
    pair = Pair()
    pair.open()
    token, reply = pair.mailbox.request_token()
    pair.feed(message(1, "answer", room=None, to="alice", re=token), message(2, "late", re=token))
    pair.feed(message(3, "other", re="someone-elses-token"))
    assert (await reply).body == "answer"
    assert (await pair.mailbox.receive(1)).body == "other"
    with pytest.raises(TimeoutError):
        await pair.mailbox.receive(0.01)


async def test_an_error_answer_fails_its_waiter_and_leaves_the_outbox() -> None:
    pair = Pair()
    pair.open()
    waiting = asyncio.ensure_future(
        pair.mailbox.send(lambda i: Publish(room="r", body=msgspec.Raw(b"1"), id=i), True, 1, "p")
    )
    await settle()
    (sent,) = pair.sent(Publish)
    pair.feed(encode_frame_of(Error(code="rate_limited", message="slow down", ref=sent.id)))
    with pytest.raises(RejectedError, match="slow down"):
        await waiting
    assert len(pair.mailbox.outbox) == 0


async def test_who_returns_the_names_of_its_members_answer() -> None:
    from securemsg.core.messages import Who

    pair = Pair()
    pair.open()
    asking = asyncio.ensure_future(pair.mailbox.send(lambda i: Who(room="r", id=i), True, 1, "w"))
    await settle()
    (sent,) = pair.sent(Who)
    pair.feed(encode_frame_of(Members(room="r", names=["a", "b"], ref=sent.id)))
    assert await asking == ["a", "b"]


async def test_a_request_that_timed_out_leaves_the_outbox_and_is_not_resent() -> None:
    # A who the server never answers (once: an answer too big to read) must not stay in the
    # outbox, resent on every reconnect, nor hold a flush forever.
    from securemsg.core.messages import Who

    pair = Pair()
    pair.open()
    with pytest.raises(TimeoutError):
        await pair.mailbox.send(lambda i: Who(room="r", id=i), True, 0.05, "who")
    assert len(pair.mailbox.outbox) == 0
    assert pair.mailbox.session.attach(resumed=True, rooms=[]) == []  # nothing to resend


async def test_flush_waits_for_what_was_sent_before_it_only() -> None:
    pair = Pair()
    pair.open()
    make = lambda i: Publish(room="r", body=msgspec.Raw(b"0"), id=i)  # noqa: E731
    for _ in range(3):
        await pair.mailbox.send(make, False, None, "p")
    flushing = asyncio.ensure_future(pair.mailbox.flushed(1))
    await settle()
    await pair.mailbox.send(make, False, None, "p")  # after the flush: not waited for
    pair.feed(encode_frame_of(ServerAck(ids=["1"])), encode_frame_of(ServerAck(ids=["3"])))
    await settle()
    assert not flushing.done()
    pair.feed(encode_frame_of(ServerAck(ids=["2"])))
    await asyncio.wait_for(flushing, 1)
    assert len(pair.mailbox.outbox) == 1
    with pytest.raises(TimeoutError, match="flush"):
        await pair.mailbox.flushed(0.01)


async def test_a_full_outbox_makes_the_sender_wait_until_an_ack_frees_a_place() -> None:
    pair = Pair(max_outbox=2)
    pair.open()
    make = lambda i: Publish(room="r", body=msgspec.Raw(b"0"), id=i)  # noqa: E731
    await pair.mailbox.send(make, False, None, "p")
    await pair.mailbox.send(make, False, None, "p")
    with pytest.raises(TimeoutError, match="publish"):
        await pair.mailbox.send(make, False, 0.01, "publish")
    third = asyncio.ensure_future(pair.mailbox.send(make, False, 1, "p"))
    await settle()
    assert not third.done()
    pair.feed(encode_frame_of(ServerAck(ids=["1"])))
    await asyncio.wait_for(third, 1)
    assert len(pair.mailbox.outbox) == 2


async def test_unanswered_frames_are_resent_with_the_same_ids_after_rejoining() -> None:
    pair = Pair()
    pair.open()
    make = lambda i: Publish(room="r", body=msgspec.Raw(b"0"), id=i)  # noqa: E731
    await pair.mailbox.send(make, False, None, "p")
    await pair.mailbox.send(make, False, None, "p")
    pair.conn.abort("test")
    await settle()
    assert pair.mailbox.conn is None
    again = Pair()
    again.mailbox = pair.mailbox
    again.open(resumed=False, rooms=["chat", "news.>"])
    await settle()
    sent = [m for m in again.sent() if type(m) is not Hello]
    assert [type(m).__name__ for m in sent] == ["Join", "Join", "Publish", "Publish"]
    assert [m.id for m in sent[2:]] == ["1", "2"]


async def test_a_full_receive_queue_stops_reading_until_drained() -> None:
    pair = Pair()
    pair.open()
    pair.feed(*(message(seq) for seq in range(1, MAX_RECEIVED + 1)))
    assert pair.transport.paused
    for _ in range(MAX_RECEIVED // 2):
        await pair.mailbox.receive(1)
    assert not pair.transport.paused


async def test_presence_events_reach_every_presence_iterator() -> None:
    from securemsg.client.mailbox import EventStream

    pair = Pair()
    pair.open()
    streams = [EventStream[Presence](), EventStream[Presence]()]
    pair.mailbox.presence_streams.update(streams)
    pair.feed(encode_frame_of(WirePresence(room="chat", name="bob", event="join")))
    for stream in streams:
        assert await anext(stream) == Presence(room="chat", name="bob", event="join")


async def test_the_heartbeat_pings_and_declares_a_silent_server_dead() -> None:
    pair = Pair()
    pair.conn.data_received(welcome())
    pair.mailbox.attach(pair.conn, resumed=True, rooms=[])
    pair.conn.attach(pair.mailbox, interval=0.02, timeout=0.1)
    await asyncio.sleep(0.06)
    assert pair.sent(Ping)
    await asyncio.wait_for(pair.conn.closed, 1)
    assert pair.transport.aborted
    assert pair.conn.reason == "heartbeat_timeout"


async def test_a_server_ping_is_answered() -> None:
    from securemsg.core.messages import Pong

    pair = Pair()
    pair.open()
    pair.feed(encode_frame_of(Ping(id=42)))
    assert [m.id for m in pair.sent(Pong)] == [42]


# -- a client that never connected -----------------------------------------------------------


async def test_sending_before_a_connection_queues_in_the_outbox() -> None:
    client = Client(CONFIG)
    await client.publish("chat", {"n": 1})
    await client.direct("bob", [1, 2])
    assert client.unacknowledged == 2
    with pytest.raises(ValueError, match="room"):
        await client.publish("bad room", 1)
    with pytest.raises(TypeError, match="JSON"):
        await client.publish("chat", object())
    await client.close(timeout=1)


async def test_close_fails_waiters_and_ends_iterators() -> None:
    client = Client(CONFIG)
    changes = client.state_changes()
    receiving = asyncio.ensure_future(client.receive())
    confirming = asyncio.ensure_future(client.publish("chat", 1, confirm=True))
    await settle()
    await asyncio.wait_for(client.close(timeout=1), 1)
    assert client.state is ClientState.CLOSED
    with pytest.raises(ClosedError):
        await receiving
    with pytest.raises(ClosedError):
        await confirming
    assert [change async for change in changes] == [Closed()]
    assert [message async for message in client] == []
    with pytest.raises(ClosedError):
        await client.publish("chat", 1)


# -- the blocking client's loop thread -------------------------------------------------------


def test_a_call_on_a_stopped_loop_thread_raises_closed_error() -> None:
    from securemsg.client.sync import _LoopThread

    thread = _LoopThread()
    assert thread.run(asyncio.sleep(0, result=7), 1) == 7
    thread.stop(1)
    assert not thread.alive
    with pytest.raises(ClosedError):
        thread.run(asyncio.sleep(0), 1)


async def test_waiting_for_an_answer_pings_so_the_held_ack_comes_with_the_pong() -> None:
    pair = Pair()
    pair.open()
    make = lambda i: Publish(room="r", body=msgspec.Raw(b"0"), id=i)  # noqa: E731
    await pair.mailbox.send(make, False, None, "p")
    await settle()
    assert not pair.sent(Ping), "a publish nobody waits for does not ping"
    confirming = asyncio.ensure_future(pair.mailbox.send(make, True, 1, "p"))
    await settle()
    kinds = [type(m) for m in pair.transport.sent() if type(m) is not Hello]
    assert kinds[-2:] == [Publish, Ping], "the ping goes after the publish it hurries"
    pair.feed(encode_frame_of(ServerAck(ids=["1", "2"])))
    assert await asyncio.wait_for(confirming, 1) is None
    assert len(pair.mailbox.outbox) == 0


async def test_an_undecodable_delivery_is_acknowledged_skipped_and_reported() -> None:
    # A body this client cannot decode (1e400 overflows a float) must not cost the connection
    # nor come back on every resume: acknowledged, reported, and the next message delivered.
    pair = Pair()
    skipped: list[Any] = []
    pair.mailbox.on_skipped = skipped.append
    pair.open()
    poison = b'{"type":"message","room":"r","from":"s","body":1e400,"ts":1.0,"seq":1}'
    pair.feed(encode_frame(poison), message(2, "after"))
    await settle()
    assert [m.seq for m in pair.sent(Ack)] == [1]  # skipped: taken; 2 waits to be taken
    assert [(s.seq, type(s).__name__) for s in skipped] == [(1, "MessageSkipped")]
    assert (await pair.mailbox.receive(1)).body == "after"
    assert pair.mailbox.take() is None  # done with it
    await settle()
    assert [m.seq for m in pair.sent(Ack)] == [1, 2]
    assert not pair.transport.closing
