"""``batch`` frames (protocol 3), bytes in and events out: consecutive publishes from the
client and deliveries from the server leave as one frame, each item judged and carried out
as if it had come alone; protocol 2 peers never see one."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from securemsg.core.connection import (
    BatchReceived,
    Client,
    ConnectionState,
    FrameRejected,
    MessageReceived,
    Server,
    UndecodableMessage,
)
from securemsg.core.delivery import message_prefix, splice_frame
from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.core.gatekeeper import DELIVERY_HEADROOM
from securemsg.core.messages import (
    MAX_BATCH_ITEMS,
    PROTOCOL_VERSION,
    Delivery,
    Direct,
    Error,
    Heartbeat,
    Hello,
    Message,
    Publish,
    Welcome,
    encode,
    encode_frame_of,
)

MAX_FRAME = 4096


def welcome(version: int, max_frame: int = MAX_FRAME) -> Welcome:
    return Welcome(
        version=version,
        session="tok",
        name="alice",
        resumed=False,
        heartbeat=Heartbeat(interval=10.0, timeout=30.0),
        max_frame=max_frame,
    )


def open_server(version: int = PROTOCOL_VERSION) -> Server:
    server = Server(now=0.0, max_frame=MAX_FRAME)
    events = server.receive_data(encode_frame_of(Hello(version=version, name="alice")), 0.0)
    assert len(events) == 1
    server.accept(welcome(version))
    server.data_to_send()  # the welcome
    assert server.state is ConnectionState.OPEN
    return server


def open_client(version: int = PROTOCOL_VERSION) -> Client:
    client = Client(now=0.0)
    client.hello(Hello(version=PROTOCOL_VERSION, name="alice"))
    client.data_to_send()
    client.receive_data(encode_frame_of(welcome(version)), 0.0)
    assert client.state is ConnectionState.OPEN
    return client


def publish(index: int, body: bytes = b'"hi"') -> Publish:
    return Publish(room="chat", body=msgspec.Raw(body), id=str(index))


def batch_of(items: list[bytes]) -> bytes:
    return encode_frame(b'{"type":"batch","items":[' + b",".join(items) + b"]}")


def delivery_frame(seq: int, body: bytes = b'"hi"') -> bytes:
    message = Delivery(room="chat", sender="bob", body=msgspec.Raw(body), ts=1.5, seq=0)
    return splice_frame(message_prefix(encode(message)), seq)


def frames_of(data: list[bytes]) -> list[Any]:
    return [msgspec.json.decode(p) for p in FrameDecoder(1 << 20).feed(b"".join(data))]


# -- the server receives ----------------------------------------------------------------------


def test_a_batch_is_its_publishes_in_order() -> None:
    server = open_server()
    items: list[Publish | Direct] = [publish(i) for i in range(3)]
    events = server.receive_data(batch_of([encode(p) for p in items]), 1.0)
    assert events == [BatchReceived(items, [])]
    assert server.state is ConnectionState.OPEN


def test_a_poison_body_refuses_its_item_alone() -> None:
    # The isolation rules hold per item: 1e400 is a number no client can decode.
    server = open_server()
    good, bad, last = publish(1), publish(2, b"1e400"), publish(3)
    events = server.receive_data(batch_of([encode(good), encode(bad), encode(last)]), 1.0)
    assert len(events) == 1
    batch = events[0]
    assert isinstance(batch, BatchReceived)
    assert batch.messages == [good, last]
    [refusal] = batch.rejected
    assert (refusal.error.code, refusal.error.ref, refusal.fatal) == ("bad_message", "2", False)
    [error] = frames_of(server.data_to_send())
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_message", "2")
    assert server.state is ConnectionState.OPEN


def test_a_batch_larger_than_a_publish_may_be_is_fatal() -> None:
    # Every item's delivery must fit max_frame: the batch obeys a publish's size rule.
    server = open_server()
    items: list[bytes] = []
    frame = b""
    while len(frame) - 4 <= MAX_FRAME - DELIVERY_HEADROOM:
        items.append(encode(publish(len(items), b'"' + b"x" * 50 + b'"')))
        frame = batch_of(items)
    assert len(frame) - 4 <= MAX_FRAME  # a frame the decoder takes, but too big a batch
    events = server.receive_data(frame, 1.0)
    assert len(events) == 1
    assert isinstance(events[0], FrameRejected)
    assert (events[0].error.code, events[0].fatal) == ("bad_frame", True)
    assert server.state is ConnectionState.CLOSING


def test_more_items_than_a_batch_may_hold_is_a_bad_message() -> None:
    server = Server(now=0.0, max_frame=1 << 20)
    server.receive_data(encode_frame_of(Hello(version=PROTOCOL_VERSION, name="a")), 0.0)
    server.accept(welcome(PROTOCOL_VERSION, 1 << 20))
    server.data_to_send()
    items = [encode(publish(i)) for i in range(MAX_BATCH_ITEMS + 1)]
    events = server.receive_data(batch_of(items), 1.0)
    assert len(events) == 1
    assert isinstance(events[0], FrameRejected)
    assert events[0].error.code == "bad_message"
    assert "batch" in events[0].error.message


def test_a_batch_before_hello_is_fatal() -> None:
    server = Server(now=0.0, max_frame=MAX_FRAME)
    events = server.receive_data(batch_of([encode(publish(1))]), 0.0)
    assert isinstance(events[0], FrameRejected) and events[0].fatal


# -- the server sends -------------------------------------------------------------------------


def test_deliveries_leave_as_one_batch_for_protocol_3() -> None:
    server = open_server()
    for seq in (1, 2, 3):
        server.send_relayed(delivery_frame(seq))
    [frame] = frames_of(server.data_to_send())
    assert frame["type"] == "batch"
    assert [item["seq"] for item in frame["items"]] == [1, 2, 3]


def test_protocol_2_gets_one_frame_per_delivery() -> None:
    server = open_server(version=2)
    for seq in (1, 2, 3):
        server.send_relayed(delivery_frame(seq))
    frames = frames_of(server.data_to_send())
    assert [(f["type"], f["seq"]) for f in frames] == [
        ("message", 1),
        ("message", 2),
        ("message", 3),
    ]


def test_other_frames_keep_their_place_between_batches() -> None:
    server = open_server()
    server.send_relayed(delivery_frame(1))
    server.send_relayed(delivery_frame(2))
    server.send(Error(code="not_member", message="no", ref="x"))
    server.send_relayed(delivery_frame(3))  # alone: a plain message frame
    frames = frames_of(server.data_to_send())
    assert [f["type"] for f in frames] == ["batch", "error", "message"]
    assert [item["seq"] for item in frames[0]["items"]] == [1, 2]
    assert frames[2]["seq"] == 3


def test_a_batch_is_cut_at_its_item_and_byte_limits() -> None:
    server = Server(now=0.0, max_frame=1 << 20)
    server.receive_data(encode_frame_of(Hello(version=PROTOCOL_VERSION, name="a")), 0.0)
    server.accept(welcome(PROTOCOL_VERSION, 1 << 20))
    server.data_to_send()
    for seq in range(1, MAX_BATCH_ITEMS + 2):
        server.send_relayed(delivery_frame(seq))
    frames = frames_of(server.data_to_send())
    assert [len(f["items"]) if f["type"] == "batch" else 1 for f in frames] == [MAX_BATCH_ITEMS, 1]
    # Bytes: the batch stays within max_frame, whatever the items.
    small = open_server()
    big = b'"' + b"y" * 1500 + b'"'
    for seq in range(1, 6):
        small.send_relayed(delivery_frame(seq, big))
    data = small.data_to_send()
    assert all(len(frame) - 4 <= MAX_FRAME for frame in data)
    seqs = [
        item["seq"]
        for f in frames_of(data)
        for item in (f["items"] if f["type"] == "batch" else [f])
    ]
    assert seqs == [1, 2, 3, 4, 5]
    assert len(data) == 3


# -- the client -------------------------------------------------------------------------------


def test_the_client_takes_a_batch_as_its_messages() -> None:
    client = open_client()
    frame = batch_of([delivery_frame(seq)[4:] for seq in (1, 2, 3)])
    events = client.receive_data(frame, 1.0)
    assert [type(e) for e in events] == [MessageReceived] * 3
    messages = [e.message for e in events if isinstance(e, MessageReceived)]
    assert all(type(m) is Message for m in messages)
    assert [m.seq for m in messages] == [1, 2, 3]  # type: ignore[union-attr]


def test_one_undecodable_item_is_skipped_and_the_others_delivered() -> None:
    # 1e400 got past no server of ours, but a client must never lose the batch's others.
    client = open_client()
    frame = batch_of(
        [delivery_frame(1)[4:], delivery_frame(2, b"1e400")[4:], delivery_frame(3)[4:]]
    )
    events = client.receive_data(frame, 1.0)
    assert [type(e) for e in events] == [MessageReceived, UndecodableMessage, MessageReceived]
    assert events[1].seq == 2  # type: ignore[union-attr]
    assert client.state is ConnectionState.OPEN


def test_the_client_batches_publishes_only_for_protocol_3() -> None:
    for version, expected in ((PROTOCOL_VERSION, ["batch"]), (2, ["publish"] * 3)):
        client = open_client(version)
        for index in range(3):
            client.send_relayed(encode_frame_of(publish(index)))
        assert [f["type"] for f in frames_of(client.data_to_send())] == expected


def test_the_client_keeps_its_batches_within_a_publish_size() -> None:
    client = open_client()
    assert client.batch_limit == MAX_FRAME - DELIVERY_HEADROOM - 32
    body = b'"' + b"z" * 500 + b'"'
    for index in range(20):
        client.send_relayed(encode_frame_of(publish(index, body)))
    data = client.data_to_send()
    assert all(len(frame) - 4 <= MAX_FRAME - DELIVERY_HEADROOM for frame in data)
    # What the client sends, the server takes: no refusal, every publish once, in order.
    server = open_server()
    ids = []
    for event in server.receive_data(b"".join(data), 1.0):
        assert isinstance(event, BatchReceived) and not event.rejected
        ids += [m.id for m in event.messages]
    assert ids == [str(i) for i in range(20)]


# -- a batch means what its items would mean alone ------------------------------------------

_DEEP = b"[" * 70 + b"]" * 70  # past max_depth (64)
_BODIES = st.sampled_from([b'"hi"', b"1", b"1e400", b"[[[[1]]]]", b'{"a":[1,2]}', b"2e308", _DEEP])
_ITEMS = st.lists(
    st.tuples(st.sampled_from(["chat", "a.b", "feed-1"]), _BODIES, st.booleans()),
    min_size=1,
    max_size=30,
)


def _outcome(events: list[Any], server: Server) -> tuple[list[Any], list[Any], list[Any]]:
    carried, refused = [], []
    for event in events:
        if isinstance(event, BatchReceived):
            carried += event.messages
            refused += [(r.error.code, r.error.ref, r.fatal) for r in event.rejected]
        elif isinstance(event, MessageReceived):
            carried.append(event.message)
        else:
            assert isinstance(event, FrameRejected)
            refused.append((event.error.code, event.error.ref, event.fatal))
    errors = [(f["code"], f.get("ref")) for f in frames_of(server.data_to_send())]
    return carried, refused, errors


@settings(max_examples=200, deadline=None)
@given(_ITEMS)
def test_a_batch_is_carried_out_as_its_items_would_be_alone(items: list[Any]) -> None:
    publishes = [
        Publish(room=room, body=msgspec.Raw(body), id=str(index) if with_id else None)
        for index, (room, body, with_id) in enumerate(items)
    ]
    alone, batched = open_server(), open_server()
    singles = b"".join(encode_frame_of(p) for p in publishes)
    one = batch_of([encode(p) for p in publishes])
    assert _outcome(alone.receive_data(singles, 1.0), alone) == _outcome(
        batched.receive_data(one, 1.0), batched
    )
    assert alone.state is batched.state is ConnectionState.OPEN
