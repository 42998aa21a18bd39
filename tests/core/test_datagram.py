"""The datagram channel's stateless rules: bytes in, verdicts and bytes out, a fake ``now``."""

from __future__ import annotations

import struct

import pytest

from securemsg.core.datagram import (
    MAX_DATAGRAM_FRAME,
    MAX_UDP_PAYLOAD,
    AssociationTable,
    CookieJar,
    SourceLimiter,
    decode_datagram,
    hello_verify_request,
    pack_datagrams,
    parse_client_hello,
    peer_key,
    split_records,
)
from securemsg.core.frames import encode_frame
from securemsg.core.messages import Hello, Publish
from securemsg.errors import ProtocolError

PEER = peer_key("192.0.2.7", 40000)


def client_hello(
    *,
    cookie: bytes = b"",
    record_seq: int = 0,
    message_seq: int = 0,
    extensions: bytes = b"",
    random: bytes = bytes(32),
) -> bytes:
    """A DTLS 1.2 ClientHello record, as a client's first (or second) flight."""
    hello = (
        b"\xfe\xfd"
        + random
        + b"\x00"  # no session id
        + bytes([len(cookie)])
        + cookie
        + b"\x00\x02\xc0\x2b"  # one suite: ECDHE-ECDSA-AES128-GCM-SHA256
        + b"\x01\x00"  # null compression
        + struct.pack(">H", len(extensions))
        + extensions
    )
    length = len(hello).to_bytes(3, "big")
    handshake = b"\x01" + length + struct.pack(">H", message_seq) + bytes(3) + length + hello
    header = struct.pack(">BHH", 22, 0xFEFF, 0) + record_seq.to_bytes(6, "big")
    return header + struct.pack(">H", len(handshake)) + handshake


# -- the ClientHello -------------------------------------------------------------------------


def test_a_client_hello_is_parsed_with_its_cookie_and_sequence_numbers() -> None:
    hello = parse_client_hello(client_hello(cookie=b"c" * 16, record_seq=1, message_seq=1))
    assert hello is not None
    assert hello.cookie == b"c" * 16
    assert hello.message_seq == 1
    assert hello.record_seq == (1).to_bytes(6, "big")


def test_a_client_hello_carries_its_random_which_tells_a_resend_from_a_new_handshake() -> None:
    first = parse_client_hello(client_hello(random=b"r" * 32))
    resent = parse_client_hello(client_hello(random=b"r" * 32, record_seq=3))
    restarted = parse_client_hello(client_hello(random=b"s" * 32))
    assert first is not None and resent is not None and restarted is not None
    assert first.random == resent.random == b"r" * 32
    assert restarted.random != first.random


def test_every_truncation_of_a_client_hello_is_refused_without_raising() -> None:
    whole = client_hello(cookie=b"c" * 16, extensions=b"\x00" * 40)
    for end in range(len(whole)):
        assert parse_client_hello(whole[:end]) is None, end


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"\x00" * 100,
        b"GET / HTTP/1.1\r\n\r\n",
        # application data (23) of epoch 1: a record of an association, not a stranger's
        struct.pack(">BHH6sH", 23, 0xFEFD, 1, bytes(6), 20) + bytes(20),
        # a ClientHello of epoch 1
        client_hello()[:3] + b"\x00\x01" + client_hello()[5:],
        # a fragment of a ClientHello (offset 0, fragment shorter than the message)
        client_hello()[: 13 + 9] + b"\x00\x00\x05" + client_hello()[13 + 12 :],
    ],
)
def test_anything_but_a_whole_client_hello_is_not_one(datagram: bytes) -> None:
    assert parse_client_hello(datagram) is None


def test_the_hello_verify_request_echoes_the_sequence_numbers_and_carries_the_cookie() -> None:
    hello = parse_client_hello(client_hello(record_seq=5, message_seq=0))
    assert hello is not None
    answer = hello_verify_request(hello, b"k" * 16)
    assert answer is not None
    kind, version, epoch, record_seq, length = struct.unpack_from(">BHH6sH", answer)
    assert (kind, version, epoch, record_seq) == (22, 0xFEFF, 0, (5).to_bytes(6, "big"))
    assert length == len(answer) - 13
    body = answer[13:]
    assert body[0] == 3  # hello_verify_request
    assert body[4:6] == b"\x00\x00"  # message_seq of the ClientHello
    assert body[-17:] == b"\x10" + b"k" * 16


def test_the_server_never_answers_with_more_bytes_than_it_was_sent() -> None:
    # A ClientHello can be shorter than a HelloVerifyRequest with a long cookie.
    hello = parse_client_hello(client_hello())
    assert hello is not None
    assert hello_verify_request(hello, b"k" * 16) is not None
    assert hello_verify_request(hello, b"k" * (hello.size - 20)) is None


# -- cookies ---------------------------------------------------------------------------------


def test_a_cookie_is_valid_for_its_peer_only() -> None:
    jar = CookieJar()
    cookie = jar.cookie(PEER, 0.0)
    assert jar.valid(PEER, cookie, 1.0)
    assert not jar.valid(peer_key("192.0.2.7", 40001), cookie, 1.0)
    assert not jar.valid(peer_key("192.0.2.8", 40000), cookie, 1.0)
    assert not jar.valid(PEER, cookie[:-1], 1.0)
    assert not jar.valid(PEER, b"", 1.0)


def test_a_cookie_outlives_one_rotation_of_the_secret_but_not_two() -> None:
    jar = CookieJar(rotation_interval=10.0)
    cookie = jar.cookie(PEER, 1.0)
    assert jar.valid(PEER, cookie, 12.0)  # the previous secret
    assert jar.cookie(PEER, 12.0) != cookie
    assert not jar.valid(PEER, cookie, 21.0)  # two rotations later


def test_a_cookie_dies_when_the_server_was_idle_for_several_rotations() -> None:
    jar = CookieJar(rotation_interval=10.0)
    cookie = jar.cookie(PEER, 1.0)
    assert not jar.valid(PEER, cookie, 35.0)


# -- the source limit ------------------------------------------------------------------------


def test_one_source_gets_its_burst_then_its_rate() -> None:
    limiter = SourceLimiter(rate=10.0, burst=5.0, slots=1 << 20)
    assert [limiter.allow("192.0.2.1", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("192.0.2.2", 0.0)  # another source has its own bucket
    assert not limiter.allow("192.0.2.1", 0.05)
    assert limiter.allow("192.0.2.1", 0.15)  # 0.15 s at 10/s: one token back


def test_the_limiter_table_does_not_grow_with_sources() -> None:
    limiter = SourceLimiter(rate=1.0, burst=1.0, slots=64)
    for number in range(5000):
        limiter.allow(f"10.0.{number // 256}.{number % 256}", 0.0)
    assert len(limiter._tokens) == 64


def test_a_zero_rate_means_no_limit() -> None:
    limiter = SourceLimiter(rate=0.0, burst=0.0)
    assert all(limiter.allow("192.0.2.1", 0.0) for _ in range(1000))


# -- associations ----------------------------------------------------------------------------


def test_the_table_refuses_past_its_cap() -> None:
    table: AssociationTable[str] = AssociationTable(
        max_associations=2, handshake_timeout=5.0, idle_timeout=60.0
    )
    assert table.add(b"a", "A", 0.0)
    assert table.add(b"b", "B", 0.0)
    assert not table.add(b"c", "C", 0.0)
    assert not table.add(b"a", "A2", 0.0)  # one association per peer
    assert len(table) == 2
    table.remove(b"a")
    assert table.add(b"c", "C", 0.0)


def test_a_handshake_that_does_not_finish_in_time_expires() -> None:
    table: AssociationTable[str] = AssociationTable(
        max_associations=10, handshake_timeout=5.0, idle_timeout=60.0
    )
    table.add(b"slow", "S", 0.0)
    table.add(b"quick", "Q", 1.0)
    table.established(b"quick", 2.0)
    assert table.expired(4.9) == []
    assert table.expired(5.0) == [(b"slow", "S", "handshake_timeout")]
    assert table.get(b"slow") is None
    assert table.get(b"quick") == "Q"


def test_an_association_expires_after_its_idle_timeout_counted_from_its_last_datagram() -> None:
    table: AssociationTable[str] = AssociationTable(
        max_associations=10, handshake_timeout=5.0, idle_timeout=10.0
    )
    for peer in (b"a", b"b"):
        table.add(peer, peer.decode(), 0.0)
        table.established(peer, 1.0)
    table.touch(b"a", 8.0)
    assert table.expired(11.0) == [(b"b", "b", "idle_timeout")]
    assert table.expired(17.9) == []
    assert table.expired(18.0) == [(b"a", "a", "idle_timeout")]
    assert len(table) == 0


# -- records and frames ----------------------------------------------------------------------


def test_records_are_split_and_packed_into_datagrams_within_the_path_mtu() -> None:
    def record(size: int) -> bytes:
        return struct.pack(">BHH6sH", 22, 0xFEFD, 0, bytes(6), size) + bytes(size)

    records = [record(700), record(400), record(300), record(50)]
    data = b"".join(records)
    assert list(split_records(data)) == records
    assert list(split_records(data + b"\x16\xfe")) == records  # a torn tail is dropped
    datagrams = pack_datagrams(iter(records))
    assert b"".join(datagrams) == data
    assert all(len(d) <= MAX_UDP_PAYLOAD for d in datagrams)
    assert len(datagrams) == 2


def test_one_datagram_carries_one_whole_frame() -> None:
    frame = encode_frame(b'{"type":"hello","version":2,"name":"probe"}')
    assert decode_datagram(frame, max_depth=64) == Hello(version=2, name="probe")
    for bad in (frame[:-1], frame + b" ", frame[:3], encode_frame(b""), frame + frame):
        with pytest.raises(ProtocolError) as caught:
            decode_datagram(bad, max_depth=64)
        assert caught.value.code == "bad_frame"


def test_a_datagram_publish_is_at_most_the_documented_size() -> None:
    def publish(size: int) -> bytes:
        head = b'{"type":"publish","room":"r","body":"'
        return encode_frame(head + b"x" * (size - len(head) - 2) + b'"}')

    assert isinstance(decode_datagram(publish(MAX_DATAGRAM_FRAME), max_depth=64), Publish)
    with pytest.raises(ProtocolError) as caught:
        decode_datagram(publish(MAX_DATAGRAM_FRAME + 1), max_depth=64)
    assert caught.value.code == "too_large"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"type":"direct","to":"bob","body":1,"id":"7"}', "bad_message"),
        (b'{"type":"who","room":"r"}', "bad_message"),
        (b'{"type":"ack","seq":1}', "bad_message"),
        (b"not json", "bad_frame"),
        (b'{"type":"nope"}', "unknown_type"),
    ],
)
def test_what_the_datagram_channel_does_not_carry_is_refused(payload: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_datagram(encode_frame(payload), max_depth=64)
    assert caught.value.code == code
    if b'"id":"7"' in payload:
        assert caught.value.ref == "7"
