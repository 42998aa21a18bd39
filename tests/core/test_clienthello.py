"""The ClientHello parser, fed real ClientHellos made by Python's own ssl module."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemsg.core.clienthello import (
    ALPN_PROTOCOL,
    MAX_CLIENT_HELLO_PEEK,
    ClientHelloInfo,
    alpn_acceptable,
    inspect_client_hello,
    offers_securemsg,
)


def client_hello(*, alpn: list[str] | None = None, server_name: str | None = None) -> bytes:
    """The bytes a real client sends first, captured through memory BIOs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ssl_object = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        ssl_object.do_handshake()
    return outgoing.read()


HELLO_WITH_ALPN = client_hello(alpn=[ALPN_PROTOCOL], server_name="chat.example.com")
HELLO_WITHOUT_ALPN = client_hello()
HELLO_WITH_OTHER_ALPN = client_hello(alpn=["h2", "http/1.1"])


def test_hello_offering_securemsg_is_tls_with_alpn() -> None:
    info = inspect_client_hello(HELLO_WITH_ALPN)
    assert info == ClientHelloInfo("tls", (ALPN_PROTOCOL,))
    assert alpn_acceptable(info)


def test_hello_without_alpn_has_alpn_none_and_is_acceptable() -> None:
    info = inspect_client_hello(HELLO_WITHOUT_ALPN)
    assert info == ClientHelloInfo("tls", None)
    assert alpn_acceptable(info)


def test_hello_offering_only_other_protocols_is_not_acceptable() -> None:
    info = inspect_client_hello(HELLO_WITH_OTHER_ALPN)
    assert info == ClientHelloInfo("tls", ("h2", "http/1.1"))
    assert not alpn_acceptable(info)


def test_securemsg_among_several_protocols_is_acceptable() -> None:
    info = inspect_client_hello(client_hello(alpn=["h2", ALPN_PROTOCOL]))
    assert info is not None
    assert info.alpn == ("h2", ALPN_PROTOCOL)
    assert alpn_acceptable(info)


def test_the_quick_check_says_yes_only_to_a_tls_record_offering_securemsg() -> None:
    assert offers_securemsg(HELLO_WITH_ALPN)
    assert offers_securemsg(client_hello(alpn=["h2", ALPN_PROTOCOL]))
    assert offers_securemsg(HELLO_WITH_ALPN[:-20])  # the entry came, the rest is OpenSSL's
    assert not offers_securemsg(HELLO_WITHOUT_ALPN)
    assert not offers_securemsg(HELLO_WITH_OTHER_ALPN)
    assert not offers_securemsg(b"GET /securemsg/1 \x0bsecuremsg/1 HTTP/1.1\r\n")
    assert not offers_securemsg(b"")


def test_trailing_bytes_after_the_hello_do_not_matter() -> None:
    assert inspect_client_hello(HELLO_WITH_ALPN + b"\x17\x03\x03junk") == inspect_client_hello(
        HELLO_WITH_ALPN
    )


@pytest.mark.parametrize("hello", [HELLO_WITH_ALPN, HELLO_WITHOUT_ALPN], ids=["alpn", "no_alpn"])
def test_every_truncation_of_a_hello_asks_for_more_bytes(hello: bytes) -> None:
    for size in range(len(hello)):
        assert inspect_client_hello(hello[:size]) is None, size


def test_hello_split_over_two_records_is_joined() -> None:
    body = HELLO_WITH_ALPN[5:]
    half = len(body) // 2
    split = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part for part in (body[:half], body[half:])
    )
    assert inspect_client_hello(split[: 5 + half]) is None
    assert inspect_client_hello(split) == inspect_client_hello(HELLO_WITH_ALPN)


def test_a_hello_too_large_to_see_is_decided_at_the_peek_limit() -> None:
    record = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + bytes(16380)
    assert len(record) == MAX_CLIENT_HELLO_PEEK
    assert inspect_client_hello(record[:-1]) is None
    assert inspect_client_hello(record) == ClientHelloInfo("tls")


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"POST /x HTTP/1.0\r\n", b"CONNECT a:443 HTTP/1.1"],
)
def test_http_request_is_recognised(data: bytes) -> None:
    assert inspect_client_hello(data) == ClientHelloInfo("http")


@pytest.mark.parametrize("data", [b"G", b"GE", b"GET", b"OPTIO"])
def test_start_of_an_http_method_waits_for_more(data: bytes) -> None:
    assert inspect_client_hello(data) is None


@pytest.mark.parametrize(
    "data",
    [
        b"hello\n",
        b"GETX / HTTP/1.1",
        b"\x00\x00\x00\x05{}",  # a securemsg frame without TLS
        b"\x80\x2e\x01\x03\x01",  # SSLv2-style hello
        b"\x17\x03\x03\x00\x05hello",  # application data record
        b"\x16\x03\x03\x00\x00",  # empty record
        b"\x16\x03\x03\x40\x01",  # record longer than 16 KiB
        b"\x16\x02\x00\x00\x04\x01\x00\x00\x00",  # not version 3
        b"\x16\x03\x03\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x03\x00\x04\x01\x00\x00\x00",  # empty ClientHello body
    ],
)
def test_anything_else_is_plaintext(data: bytes) -> None:
    assert inspect_client_hello(data) == ClientHelloInfo("plaintext")


def test_empty_input_waits_for_more() -> None:
    assert inspect_client_hello(b"") is None


def test_corrupted_extension_lengths_make_it_plaintext() -> None:
    corrupt = bytearray(HELLO_WITH_ALPN)
    corrupt[-1:] = b""  # the last extension now overruns the body
    body_length = int.from_bytes(corrupt[6:9], "big") - 1
    corrupt[6:9] = body_length.to_bytes(3, "big")
    corrupt[3:5] = (len(corrupt) - 5).to_bytes(2, "big")
    assert inspect_client_hello(bytes(corrupt)) == ClientHelloInfo("plaintext")


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    inspect_client_hello(data)
    inspect_client_hello(b"\x16\x03\x01" + data)


@given(st.data())
def test_mutated_hellos_never_raise(data: st.DataObject) -> None:
    hello = bytearray(data.draw(st.sampled_from([HELLO_WITH_ALPN, HELLO_WITH_OTHER_ALPN])))
    size = data.draw(st.integers(0, len(hello)))
    for _ in range(data.draw(st.integers(0, 4))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    result = inspect_client_hello(bytes(hello[:size]))
    assert result is None or result.kind in {"tls", "plaintext"}
