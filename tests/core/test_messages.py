"""Wire messages: every type round-trips, every bad input is a typed ProtocolError."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemsg.core import messages
from securemsg.core.messages import (
    FATAL_CODES,
    Ack,
    Bye,
    Delivery,
    Direct,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Join,
    Leave,
    Members,
    Ping,
    Pong,
    Presence,
    Publish,
    ServerAck,
    Welcome,
    Who,
    decode_body,
    decode_client,
    decode_server,
    encode,
    encode_body,
    encode_frame_of,
)
from securemsg.errors import ProtocolError

BODY = msgspec.Raw(b'{"text":"hi","n":[1,2.5,null]}')

CLIENT_MESSAGES = [
    Hello(version=2, name="alice", token="secret", session="tok", last_seq=7),
    Hello(version=2),
    Join(room="chat.general", id="1"),
    Join(room="sensors.*.temp"),
    Join(room="sensors.>"),
    Leave(room="chat.general", id="2"),
    Leave(room="*"),
    Publish(room="chat.general", body=BODY, id="3", reply_to="req-1"),
    Publish(room="a", body=msgspec.Raw(b"42")),
    Direct(to="bob", body=BODY, id="4", re="req-1"),
    Direct(to="bob@example.org", body=msgspec.Raw(b'"x"')),
    Who(room="chat.general", id="5"),
    Who(room=">"),
    Ack(seq=0),
    Ack(seq=12),
    Ping(id=1),
    Pong(id=1),
    Bye(),
    Bye(reason="done"),
]

SERVER_MESSAGES = [
    Welcome(
        version=2,
        session="tok",
        name="alice",
        resumed=False,
        heartbeat=Heartbeat(interval=10.0, timeout=30.0),
        max_frame=1048576,
    ),
    Delivery(room="chat.general", sender="alice", body=BODY, id="3", reply_to="r", ts=1.5, seq=1),
    Delivery(sender="alice", to="bob", body=BODY, re="r", ts=1.5, seq=2),
    ServerAck(ids=["3"]),
    Presence(room="chat.general", name="bob", event="join"),
    Presence(room="sensors.>", name="bob", event="leave"),
    Members(room="chat.general", names=["alice", "bob"], ref="5"),
    Members(room="empty", names=[]),
    Error(code="not_member", message="not a member of 'x'", ref="2"),
    Error(code="bad_frame", message="frame is not valid JSON"),
    Ping(id=3),
    Pong(id=3),
    Bye(reason="server_shutdown"),
]


def _id(message: msgspec.Struct) -> str:
    return type(message).__name__


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=_id)
def test_every_client_message_round_trips(message: msgspec.Struct) -> None:
    payload = encode(message)
    assert decode_client(payload) == message
    assert msgspec.json.decode(payload)["type"] == message.__struct_config__.tag


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=_id)
def test_every_server_message_round_trips(message: msgspec.Struct) -> None:
    payload = encode(message)
    assert decode_server(payload) == message
    assert msgspec.json.decode(payload)["type"] == message.__struct_config__.tag


def test_the_two_acks_belong_to_their_own_direction() -> None:
    assert decode_client(b'{"type":"ack","seq":4}') == Ack(seq=4)
    assert decode_server(b'{"type":"ack","ids":["4"]}') == ServerAck(ids=["4"])
    with pytest.raises(ProtocolError) as info:
        decode_client(b'{"type":"ack","id":"4"}')
    assert (info.value.code, info.value.ref) == ("bad_message", "4")


def test_message_sender_is_from_on_the_wire() -> None:
    wire = msgspec.json.decode(encode(SERVER_MESSAGES[1]))
    assert wire["from"] == "alice"
    assert "sender" not in wire


def test_optional_fields_that_are_unset_are_left_out() -> None:
    assert encode(Join(room="a")) == b'{"type":"join","room":"a"}'
    assert encode(Bye()) == b'{"type":"bye"}'


def test_a_message_frame_is_the_length_then_the_json() -> None:
    frame = encode_frame_of(Ping(id=1))
    assert frame == b"\x00\x00\x00\x16" + b'{"type":"ping","id":1}'


def test_bodies_are_any_json_value() -> None:
    values: list[Any] = [{"a": [1, None, True]}, "text", 3, 2.5, None, []]
    for value in values:
        assert decode_body(encode_body(value)) == value
    with pytest.raises(TypeError):
        encode_body(object())


# -- rejected input ---------------------------------------------------------------------------


def rejected(payload: bytes, *, server: bool = False) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        (decode_server if server else decode_client)(payload)
    return info.value


def test_an_unknown_type_is_unknown_type_with_the_string_id_as_ref() -> None:
    error = rejected(b'{"type":"shout","id":"abc","room":"a"}')
    assert (error.code, error.ref) == ("unknown_type", "abc")
    assert rejected(b'{"type":"shout","id":5}').ref is None


def test_each_direction_rejects_the_other_directions_types() -> None:
    assert rejected(encode(SERVER_MESSAGES[0])).code == "unknown_type"
    assert rejected(encode(CLIENT_MESSAGES[0]), server=True).code == "unknown_type"
    assert rejected(b'{"type":"message"}').code == "unknown_type"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"join","id":"7"}',  # missing room
        b'{"type":"publish","room":"a","id":"7"}',  # missing body
        b'{"type":"join","room":5,"id":"7"}',  # wrong type
        b'{"type":"ack","seq":"1","id":"7"}',
        b'{"type":"ack","seq":-1,"id":"7"}',
        b'{"type":"ping","id":"7"}',
        b'{"type":"hello","version":"1","id":"7"}',
        b'{"type":"bye","reason":3,"id":"7"}',
    ],
)
def test_a_missing_or_wrong_typed_field_is_bad_message(payload: bytes) -> None:
    error = rejected(payload)
    assert (error.code, error.ref) == ("bad_message", "7")


def test_a_missing_or_non_string_type_is_bad_message() -> None:
    assert rejected(b'{"room":"a"}').code == "bad_message"
    assert rejected(b'{"type":1}').code == "bad_message"
    assert rejected(b'{"type":null}', server=True).code == "bad_message"


@pytest.mark.parametrize(
    "payload",
    [
        b"[1,2]",
        b"1",
        b'"hello"',
        b"null",
        b"{",
        b"",
        b'{"type":"ping","id":1}x',
        b"\xff\xfe",
        b'{"type":"publish","room":"a","body":"\xc3"}',  # invalid UTF-8 inside the body
        b'{"type":"shout",',  # the type is known bad before the JSON ends
        b'{"type":"join","room":"a b",',
        b"[1,",
    ],
)
def test_what_is_not_a_json_object_in_utf8_is_bad_frame(payload: bytes) -> None:
    assert rejected(payload).code == "bad_frame"
    assert rejected(payload, server=True).code == "bad_frame"


def test_a_lone_surrogate_escape_is_bad_frame() -> None:
    assert rejected(rb'{"type":"shout","id":"\ud800"}').code == "bad_frame"


def test_valid_non_ascii_utf8_is_accepted() -> None:
    message = decode_client('{"type":"publish","room":"a","body":"grüße 😀"}'.encode())
    assert isinstance(message, Publish)
    assert decode_body(message.body) == "grüße 😀"


# -- rooms and names --------------------------------------------------------------------------

CONCRETE = ["a", "chat.general", "A-b_c.0.x-y", "a." + "b" * 250]
PATTERNS = ["*", ">", "a.*", "a.>", "*.b.>", "a.*.c", "*.*"]
INVALID = [
    "",
    ".",
    "a.",
    ".a",
    "a..b",
    "a b",
    "a.b>",
    "a*",
    "a.>.b",
    ">.a",
    "a.**",
    "ü",
    "a/b",
    "a\n",
    "a.b\n",
    "\na",
]


@pytest.mark.parametrize("room", CONCRETE)
def test_every_message_accepts_a_concrete_room(room: str) -> None:
    for kind in ("join", "leave", "who"):
        assert decode_client(encode({"type": kind, "room": room})).room == room  # type: ignore[union-attr]
    publish = decode_client(encode({"type": "publish", "room": room, "body": 1}))
    assert isinstance(publish, Publish)


@pytest.mark.parametrize("room", PATTERNS)
def test_join_leave_and_who_accept_wildcards_but_publish_needs_a_concrete_room(room: str) -> None:
    for kind in ("join", "leave", "who"):
        assert decode_client(encode({"type": kind, "room": room})).room == room  # type: ignore[union-attr]
    assert rejected(encode({"type": "publish", "room": room, "body": 1})).code == "bad_message"


@pytest.mark.parametrize("room", INVALID)
def test_malformed_rooms_are_bad_message(room: str) -> None:
    for kind in ("join", "leave", "who"):
        assert rejected(encode({"type": kind, "room": room})).code == "bad_message"
    assert rejected(encode({"type": "publish", "room": room, "body": 1})).code == "bad_message"


def test_rooms_longer_than_255_characters_are_bad_message() -> None:
    room = "a." + "b" * 254
    assert rejected(encode({"type": "join", "room": room})).code == "bad_message"


@pytest.mark.parametrize("name", ["alice", "a", "bob@example.org", "x.y_z-1", "n" * 64])
def test_valid_names(name: str) -> None:
    assert decode_client(encode({"type": "hello", "version": 2, "name": name})) == Hello(
        version=2, name=name
    )
    assert isinstance(decode_client(encode({"type": "direct", "to": name, "body": 1})), Direct)


@pytest.mark.parametrize("name", ["", "n" * 65, "a b", "ü", "a/b", "a:b", "*", "bob\n", "\nbob"])
def test_invalid_names_are_bad_message(name: str) -> None:
    assert rejected(encode({"type": "hello", "version": 2, "name": name})).code == "bad_message"
    assert rejected(encode({"type": "direct", "to": name, "body": 1})).code == "bad_message"


def test_fatal_codes_are_error_codes_and_per_message_codes_are_not_fatal() -> None:
    assert set(FATAL_CODES) <= set(ErrorCode)
    for code in ("bad_message", "unknown_type", "no_such_user", "not_member", "rate_limited"):
        assert code not in FATAL_CODES
    for code in ("bad_frame", "too_large", "heartbeat_timeout", "slow_consumer"):
        assert code in FATAL_CODES


# -- properties -------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = json_scalars | st.lists(json_scalars, max_size=3)
field_names = st.sampled_from(
    ["id", "room", "body", "to", "seq", "version", "name", "reply_to", "re", "from", "ts"]
)
type_names = st.sampled_from(
    sorted(messages._CLIENT_TYPES | messages._SERVER_TYPES | {"shout", ""})
) | st.text(max_size=5)


@st.composite
def near_messages(draw: st.DrawFn) -> bytes:
    """JSON objects shaped like messages, sometimes cut short or with bytes appended."""
    obj: dict[str, Any] = draw(st.dictionaries(field_names, json_values, max_size=5))
    if draw(st.booleans()):
        obj["type"] = draw(type_names)
    payload = msgspec.json.encode(obj)
    cut = draw(st.integers(min_value=0, max_value=len(payload)))
    return payload[: len(payload) - cut] + draw(st.binary(max_size=4))


@given(st.binary(max_size=200) | near_messages())
@settings(max_examples=400)
def test_arbitrary_bytes_raise_nothing_but_protocol_error(payload: bytes) -> None:
    for decode in (decode_client, decode_server):
        try:
            decode(payload)
        except ProtocolError as exc:
            assert exc.code in {"bad_frame", "bad_message", "unknown_type"}
            assert exc.ref is None or isinstance(exc.ref, str)


# -- docs/protocol.md says the same ---------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def doc_examples() -> list[tuple[str, bytes]]:
    """Every JSON line in a code block of the protocol doc, with its direction if marked."""
    found: list[tuple[str, bytes]] = []
    in_code = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        direction, _, rest = line.partition(" ")
        if in_code and direction in {">", "<"} and rest.startswith("{"):
            found.append((direction, rest.encode()))
        elif in_code and line.startswith("{"):
            found.append(("?", line[: line.rindex("}") + 1].encode()))
    return found


def test_every_json_example_in_the_protocol_doc_is_a_valid_message() -> None:
    examples = doc_examples()
    assert len(examples) > 30
    for direction, payload in examples:
        decoders: list[Callable[[bytes], Any]] = [decode_client, decode_server]
        if direction != "?":
            decoders = [decode_client] if direction == ">" else [decode_server]
        ok = []
        for decode in decoders:
            try:
                ok.append(decode(payload))
            except ProtocolError:
                pass
        assert ok, payload


def test_the_protocol_doc_states_the_patterns_and_fatal_codes_of_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert messages.NAME_PATTERN in text
    assert messages.ROOM_PATTERN in text
    assert messages.ROOM_FILTER_PATTERN.replace("|", r"\|") in text
    rows = re.findall(r"^\| `([a-z_]+)` +\| (yes|no\*?) +\|", text, flags=re.MULTILINE)
    assert {code for code, _ in rows} == set(ErrorCode)
    assert {code for code, fatal in rows if fatal == "yes"} == set(FATAL_CODES)


def test_the_hex_frame_in_the_protocol_doc_is_exact() -> None:
    text = DOC.read_text(encoding="utf-8")
    hex_block = text.split("## 11. Worked example")[1].split("```")[1]
    frame = bytes.fromhex(" ".join(hex_block.split()))
    assert frame == encode_frame_of(Join(room="chat.general", id="1"))


def test_a_room_or_name_remembered_as_valid_does_not_let_a_variant_through() -> None:
    # Publish and direct check rooms and names against a cache of values seen valid: the
    # cache must only ever answer for the exact same string.
    for _ in range(2):
        assert isinstance(decode_client(b'{"type":"publish","room":"a.b","body":1}'), Publish)
        assert isinstance(decode_client(b'{"type":"direct","to":"bob","body":1}'), Direct)
    for payload in (
        b'{"type":"publish","room":"a.b\\n","body":1}',
        b'{"type":"publish","room":"a.b.","body":1}',
        b'{"type":"publish","room":"a.*","body":1}',
        b'{"type":"direct","to":"bob\\n","body":1}',
        b'{"type":"direct","to":"bob ","body":1}',
    ):
        assert rejected(payload).code == "bad_message", payload
    with pytest.raises(ValueError, match="bad 'room'"):
        Publish(room="a b", body=msgspec.Raw(b"1"))
