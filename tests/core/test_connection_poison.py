"""Poison at the connection cores: the server answers it and carries on; a client skips a
delivered message it cannot decode; the client's read limit follows ``welcome.max_frame``."""

from __future__ import annotations

import msgspec
import pytest

from securemsg.core.connection import (
    Client,
    ConnectionState,
    FrameRejected,
    MessageReceived,
    Server,
    UndecodableMessage,
)
from securemsg.core.frames import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from securemsg.core.gatekeeper import DELIVERY_HEADROOM
from securemsg.core.messages import (
    Delivery,
    Heartbeat,
    Hello,
    Message,
    Publish,
    Welcome,
    decode_server,
    encode_frame_of,
)

OPEN = ConnectionState.OPEN


def welcome(max_frame: int = DEFAULT_MAX_FRAME) -> Welcome:
    heartbeat = Heartbeat(interval=10.0, timeout=30.0)
    return Welcome(
        version=2, session="s", name="bob", resumed=False, heartbeat=heartbeat, max_frame=max_frame
    )


def open_server(**options: int) -> Server:
    server = Server(now=0.0, **options)  # type: ignore[arg-type]
    assert server.receive_data(encode_frame_of(Hello(version=2, name="alice")), 0.0)
    server.accept(welcome())
    server.data_to_send()
    return server


def open_client(max_frame: int = DEFAULT_MAX_FRAME) -> Client:
    client = Client(now=0.0)
    assert client.receive_data(encode_frame_of(welcome(max_frame)), 0.0)
    assert client.state is OPEN
    return client


def sent_errors(server: Server) -> list[tuple[str, str | None]]:
    payloads = FrameDecoder().feed(b"".join(server.data_to_send()))
    return [(m.code, m.ref) for m in map(decode_server, payloads)]  # type: ignore[union-attr]


def publish_frame(body: bytes, msg_id: str = "p1") -> bytes:
    return encode_frame(
        b'{"type":"publish","room":"chat","body":' + body + b',"id":"' + msg_id.encode() + b'"}'
    )


def delivery_frame(body: bytes, seq: int) -> bytes:
    head = b'{"type":"message","room":"chat","from":"alice","body":'
    return encode_frame(head + body + b',"ts":1.0,"seq":%d}' % seq)


# -- server -----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_a_body_too_deep_gets_an_error_with_its_ref_and_the_connection_stays_open(
    depth: int,
) -> None:
    # It used to raise RecursionError out of receive_data: no error frame, no event.
    server = open_server()
    events = server.receive_data(publish_frame(b"[" * depth + b"]" * depth, "deep"), 1.0)
    assert len(events) == 1 and isinstance(events[0], FrameRejected)
    assert (events[0].error.code, events[0].fatal) == ("bad_message", False)
    assert sent_errors(server) == [("bad_message", "deep")]
    assert server.state is OPEN
    events = server.receive_data(publish_frame(b"1", "next"), 2.0)
    assert [type(e) for e in events] == [MessageReceived]


@pytest.mark.parametrize(
    "body", [b"1e400", b"9" * 5000, b"[" * 65 + b"]" * 65], ids=["1e400", "int5000", "depth65"]
)
def test_the_server_core_refuses_what_a_client_could_not_decode(body: bytes) -> None:
    server = open_server()
    (event,) = server.receive_data(publish_frame(body), 1.0)
    assert isinstance(event, FrameRejected) and not event.fatal
    assert sent_errors(server) == [("bad_message", "p1")]
    assert server.state is OPEN


def test_the_server_core_takes_max_depth_from_its_driver() -> None:
    server = open_server(max_depth=4)
    assert server.receive_data(publish_frame(b"[[[[1]]]]", "ok"), 1.0) == [
        MessageReceived(Publish(room="chat", body=msgspec.Raw(b"[[[[1]]]]"), id="ok"))
    ]
    (event,) = server.receive_data(publish_frame(b"[[[[[1]]]]]", "no"), 1.0)
    assert isinstance(event, FrameRejected)
    assert sent_errors(server) == [("bad_message", "no")]


def test_the_server_core_keeps_headroom_under_its_max_frame() -> None:
    server = open_server(max_frame=4096)
    fits = publish_frame(b'"' + b"x" * (4096 - DELIVERY_HEADROOM - 52) + b'"')
    assert len(fits) - 4 == 4096 - DELIVERY_HEADROOM
    assert [type(e) for e in server.receive_data(fits, 1.0)] == [MessageReceived]
    (event,) = server.receive_data(publish_frame(b'"' + b"x" * 4000 + b'"', "big"), 1.0)
    assert isinstance(event, FrameRejected) and not event.fatal
    assert sent_errors(server) == [("bad_message", "big")]


# -- client -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"1e400", b"9" * 5000, b"[" * 2_000 + b"]" * 2_000, b"[" * 100_000 + b"]" * 100_000],
    ids=["1e400", "int5000", "depth2000", "depth100000"],
)
def test_a_delivered_message_the_client_cannot_decode_is_an_event_with_its_seq(
    body: bytes,
) -> None:
    # It used to be a fatal bad_frame (or a RecursionError out of receive_data): the client
    # reconnected, was sent the same message first, and never got past it.
    client = open_client()
    events = client.receive_data(delivery_frame(body, 7) + delivery_frame(b'"next"', 8), 1.0)
    assert len(events) == 2
    assert isinstance(events[0], UndecodableMessage) and events[0].seq == 7
    assert events[0].reason
    assert events[1] == MessageReceived(
        Message(room="chat", sender="alice", body="next", time=1.0, seq=8)
    )
    assert client.state is OPEN


def test_a_frame_that_is_not_a_valid_message_is_still_fatal_at_the_client() -> None:
    client = open_client()
    (event,) = client.receive_data(encode_frame(b'{"type":"message","body":1e400}'), 1.0)
    assert isinstance(event, FrameRejected) and event.fatal


def test_the_client_read_limit_follows_welcome_max_frame() -> None:
    # A resumed session's replay comes in the same read as the welcome that allows it.
    big = delivery_frame(b'"' + b"x" * (3 * 1024 * 1024) + b'"', 1)
    client = Client(now=0.0)
    events = client.receive_data(encode_frame_of(welcome(4 * 1024 * 1024)) + big, 0.0)
    assert [type(e) for e in events] == [MessageReceived, MessageReceived]
    assert client.max_frame == 4 * 1024 * 1024
    assert client.state is OPEN
    # Under the default limit the same frame is too large.
    client = open_client()
    (event,) = client.receive_data(big, 1.0)
    assert isinstance(event, FrameRejected) and event.error.code == "too_large"


def test_a_tiny_welcome_max_frame_does_not_shrink_the_client_read_limit() -> None:
    # The server's own frames (acks of many ids) are not bound by its max_frame.
    assert open_client(1024).max_frame == DEFAULT_MAX_FRAME


def test_frames_after_welcome_in_one_read_are_decoded_byte_by_byte_too() -> None:
    data = encode_frame_of(welcome()) + delivery_frame(b"1", 1) + delivery_frame(b"1e400", 2)
    client = Client(now=0.0)
    events = []
    for index in range(len(data)):
        events += client.receive_data(data[index : index + 1], 0.0)
    assert [type(e) for e in events] == [MessageReceived, MessageReceived, UndecodableMessage]


def test_the_delivered_form_of_an_accepted_publish_fits_a_client_at_that_max_frame() -> None:
    max_frame = 4096
    server = open_server(max_frame=max_frame)
    payload = publish_frame(b'"' + b"x" * (max_frame - DELIVERY_HEADROOM - 52) + b'"')
    (event,) = server.receive_data(payload, 1.0)
    assert isinstance(event, MessageReceived) and isinstance(event.message, Publish)
    message = event.message
    out = Delivery(
        room=message.room, sender="n" * 64, body=message.body, id=message.id, ts=1e300, seq=2**53
    )
    client = Client(now=0.0, max_frame=max_frame)
    client.receive_data(encode_frame_of(welcome(max_frame)), 0.0)
    client._decoder.max_frame = max_frame  # as tight as the server's limit
    (received,) = client.receive_data(encode_frame_of(out), 1.0)
    assert isinstance(received, MessageReceived)
