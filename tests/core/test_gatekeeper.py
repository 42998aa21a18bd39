"""The gatekeeper: the server decodes a publish or direct only if every client can receive it.

Bodies too deep, numbers a client cannot decode and frames without room for the server's own
fields are refused (``bad_message``, with the request's ref); a frame too deep for msgspec
is a ProtocolError too, never a RecursionError.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemsg.core.frames import DEFAULT_MAX_FRAME
from securemsg.core.gatekeeper import (
    DEFAULT_MAX_DEPTH,
    DELIVERY_HEADROOM,
    body_problem,
    bracket_skeleton,
    delivered_size_bound,
    nesting_exceeds,
    top_level_value,
)
from securemsg.core.messages import (
    Delivery,
    Direct,
    Publish,
    decode_at_client,
    decode_client,
    encode,
)
from securemsg.errors import ProtocolError


def publish(body: bytes, *, msg_id: str = "p1") -> bytes:
    return b'{"type":"publish","room":"chat","body":' + body + b',"id":"' + msg_id.encode() + b'"}'


def direct(body: bytes, *, msg_id: str = "d1") -> bytes:
    return b'{"type":"direct","to":"bob","body":' + body + b',"id":"' + msg_id.encode() + b'"}'


def delivered(body: bytes, *, seq: int = 7) -> bytes:
    return (
        b'{"type":"message","room":"chat","from":"a","body":'
        + body
        + b',"ts":1.0,"seq":%d}' % (seq)
    )


def refusal(payload: bytes, **limits: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client(payload, **limits)
    return info.value


def nested(depth: int, *, kind: str = "array") -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


# -- depth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["array", "object"])
def test_a_body_one_level_past_max_depth_is_refused_with_the_ref(kind: str) -> None:
    assert isinstance(decode_client(publish(nested(DEFAULT_MAX_DEPTH, kind=kind))), Publish)
    error = refusal(publish(nested(DEFAULT_MAX_DEPTH + 1, kind=kind)))
    assert (error.code, error.ref) == ("bad_message", "p1")
    assert f"max_depth ({DEFAULT_MAX_DEPTH})" in error.message
    error = refusal(direct(nested(DEFAULT_MAX_DEPTH + 1, kind=kind)))
    assert (error.code, error.ref) == ("bad_message", "d1")


def test_max_depth_is_a_parameter() -> None:
    assert isinstance(decode_client(publish(nested(3)), max_depth=3), Publish)
    assert refusal(publish(nested(4)), max_depth=3).code == "bad_message"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    body = b'["' + b"[{" * 200 + b'\\"[[[\\\\", "\\\\\\"]]]"]'
    assert isinstance(decode_client(publish(body)), Publish)


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_a_body_too_deep_for_msgspec_is_bad_message_with_the_ref_not_recursion_error(
    depth: int,
) -> None:
    # Without the gatekeeper: RecursionError escaped decode_client.
    for kind in ("array", "object"):
        error = refusal(publish(nested(depth, kind=kind), msg_id="deep"))
        assert (error.code, error.ref) == ("bad_message", "deep")


def test_a_frame_too_deep_for_msgspec_whatever_its_type_is_a_protocol_error() -> None:
    payload = b'{"type":"join","room":"chat","x":' + nested(5_000) + b',"id":"j1"}'
    error = refusal(payload)
    assert (error.code, error.ref) == ("bad_message", "j1")
    # An invalid field before the deep part: the slow path that explains it recursed too.
    payload = b'{"type":"publish","room":"a b","body":' + nested(5_000) + b',"id":"p2"}'
    error = refusal(payload)
    assert (error.code, error.ref) == ("bad_message", "p2")


def test_the_ref_of_a_deep_frame_is_its_own_id_not_one_inside_the_body() -> None:
    body = b'{"id":"inner","x":' + nested(3_000) + b"}"
    payload = b'{"type":"publish","room":"chat","body":' + body + b',"id":"out\\"er"}'
    assert refusal(payload).ref == 'out"er'
    assert top_level_value(payload, "type") == "publish"
    assert top_level_value(b'["id","x"]', "id") is None
    assert top_level_value(b'{"a":"id","b":1}', "id") is None


def _depth(value: Any) -> int:
    """Nesting of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            level += 1
            deepest = max(deepest, level)
            stack.extend(
                (child, level) for child in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='[]{}"\\ab,:'),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=40,
)


@given(json_values, st.integers(min_value=0, max_value=12))
@settings(max_examples=400)
def test_the_linear_depth_scan_agrees_with_the_depth_of_the_value(value: Any, limit: int) -> None:
    text = msgspec.json.encode(value)
    assert nesting_exceeds(bracket_skeleton(text), limit) == (_depth(value) > limit)


# -- numbers ----------------------------------------------------------------------------------

BAD_NUMBERS = [
    b"1e400",
    b"-1e400",
    b"2e308",
    b"1E+309",
    b"1" + b"0" * 309 + b".0",
    b"9" * 4301,
    b"9" * 5000,
    b"-" + b"9" * 4300,
]
GOOD_NUMBERS = [
    b"1.7976931348623157e308",
    b"1e-400",
    b"9" * 4300,
    b"-" + b"9" * 4299,
    b"0." + b"9" * 5000,
    b"123",
]


@pytest.mark.parametrize("number", BAD_NUMBERS, ids=lambda n: n[:12].decode() + f"({len(n)})")
def test_a_number_a_client_cannot_decode_is_refused_with_the_ref(number: bytes) -> None:
    for body in (
        number,
        b"[" + number + b"]",
        b'{"pad":"' + b"x" * 200 + b'","n":[1,' + number + b"]}",
    ):
        with pytest.raises(ProtocolError):
            decode_at_client(delivered(body))  # what the client would do with it
        error = refusal(publish(body))
        assert (error.code, error.ref) == ("bad_message", "p1"), body[:40]


@pytest.mark.parametrize("number", GOOD_NUMBERS, ids=lambda n: n[:12].decode() + f"({len(n)})")
def test_a_number_a_client_can_decode_is_relayed(number: bytes) -> None:
    for body in (
        number,
        b"[" + number + b"]",
        b'{"pad":"' + b"x" * 200 + b'","n":[1,' + number + b"]}",
    ):
        decode_at_client(delivered(body))
        assert isinstance(decode_client(publish(body)), Publish)


numbers = st.one_of(
    st.builds(
        lambda sign, first, digits: sign + first + b"7" * digits,
        st.sampled_from([b"", b"-"]),
        st.sampled_from([b"1", b"9"]),
        st.integers(min_value=0, max_value=4400),
    ),
    st.builds(
        lambda m, e: f"{m}e{e}".encode(),
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e10, max_value=1e10),
        st.integers(min_value=-400, max_value=400),
    ),
    st.builds(lambda d: b"1" * d + b".5", st.integers(min_value=1, max_value=400)),
)


@given(st.lists(numbers, min_size=1, max_size=3), st.integers(min_value=0, max_value=300))
@settings(max_examples=300)
def test_the_server_refuses_exactly_the_bodies_a_client_cannot_decode(
    items: list[bytes], padding: int
) -> None:
    body = b'{"p":"' + b"e" * padding + b'","n":[' + b",".join(items) + b'],"t":true}'
    try:
        decode_at_client(delivered(body))
        client_ok = True
    except ProtocolError:
        client_ok = False
    assert (body_problem(body, max_depth=DEFAULT_MAX_DEPTH) is None) == client_ok


# -- headroom ---------------------------------------------------------------------------------

WORST_NAME = "n" * 64
WORST_TS = -2.2250738585072014e-308
WORST_SEQ = 2**53


def _as_delivered(message: Publish | Direct) -> bytes:
    if isinstance(message, Publish):
        out = Delivery(
            room=message.room,
            sender=WORST_NAME,
            body=message.body,
            id=message.id,
            reply_to=message.reply_to,
            ts=WORST_TS,
            seq=WORST_SEQ,
        )
    else:
        out = Delivery(
            sender=WORST_NAME,
            to=message.to,
            body=message.body,
            id=message.id,
            re=message.re,
            ts=WORST_TS,
            seq=WORST_SEQ,
        )
    return encode(out)


def _sized(kind: str, size: int, *, msg_id: str, token: str) -> bytes:
    """A publish or direct of exactly ``size`` bytes (padded in its body)."""
    if kind == "publish":
        head = {"type": "publish", "room": "r." * 120 + "room", "id": msg_id, "reply_to": token}
    else:
        head = {"type": "direct", "to": "b" * 64, "id": msg_id, "re": token}
    empty = len(encode({**head, "body": ""}))
    return encode({**head, "body": "x" * (size - empty)})


@pytest.mark.parametrize("kind", ["publish", "direct"])
def test_the_largest_accepted_publish_is_delivered_within_max_frame(kind: str) -> None:
    max_frame = 8192
    # Ids and tokens full of characters that JSON escapes.
    msg_id, token = '"\\\x01\n' * 32, "\x1f" * 1024
    largest = _sized(kind, max_frame - DELIVERY_HEADROOM, msg_id=msg_id, token=token)
    message = decode_client(largest, max_frame=max_frame)
    assert isinstance(message, (Publish, Direct))
    out = _as_delivered(message)
    assert len(out) <= delivered_size_bound(len(largest)) == max_frame
    # One byte more and it would not fit: refused, with the ref, before it is relayed.
    error = refusal(_sized(kind, len(largest) + 1, msg_id="big", token="t"), max_frame=max_frame)
    assert (error.code, error.ref) == ("bad_message", "big")
    assert f"at most {max_frame - DELIVERY_HEADROOM} bytes" in error.message


def test_a_publish_of_exactly_max_frame_bytes_is_refused_not_relayed_too_large() -> None:
    # It used to be accepted, and delivered as 1,048,621 bytes: over every client's limit.
    payload = _sized("publish", DEFAULT_MAX_FRAME, msg_id="max", token="t")
    error = refusal(payload)
    assert (error.code, error.ref) == ("bad_message", "max")


@given(
    st.text(min_size=1, max_size=128),
    st.none() | st.text(max_size=200),
    st.sampled_from(["publish", "direct"]),
    st.integers(min_value=0, max_value=300),
)
@settings(max_examples=300)
def test_a_delivered_message_never_exceeds_its_bound(
    msg_id: str, token: str | None, kind: str, size: int
) -> None:
    body = encode_body_text("y" * size)
    if kind == "publish":
        payload = encode(Publish(room="chat.x", body=body, id=msg_id, reply_to=token))
    else:
        payload = encode(Direct(to="bob", body=body, id=msg_id, re=token))
    message = decode_client(payload)
    assert isinstance(message, (Publish, Direct))
    assert len(_as_delivered(message)) <= delivered_size_bound(len(payload))


def encode_body_text(text: str) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(text))
