"""No client can harm another (issue 11), over real TLS: bodies that some client could not
decode are refused at the publisher, with the request's id, and the room carries on."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from securemsg.core.gatekeeper import DELIVERY_HEADROOM
from securemsg.core.messages import Delivery, Error, Join, Publish, ServerAck
from tests.integration.conftest import StartServer

POISON = {
    "float_overflow": b"1e400",
    "long_integer": b"9" * 5_000,
    "too_deep": b"[" * 65 + b"]" * 65,
    "far_too_deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("body", POISON.values(), ids=POISON.keys())
async def test_a_poison_body_is_refused_with_its_id_and_the_room_carries_on(
    start_server: StartServer, raw: Any, body: bytes
) -> None:
    server = await start_server(max_depth=64, max_frame=1 << 20)
    sub = await raw(server.port, "sub")
    sub.send(Join(room="r", id="j"))
    await sub.recv_type(ServerAck)
    pub = await raw(server.port, "pub")
    pub.send(Publish(room="r", body=msgspec.Raw(body), id="poison"))
    pub.send(Publish(room="r", body=msgspec.Raw(b'"fine"'), id="fine"))
    refusal = await pub.recv_type(Error)
    assert (refusal.code, refusal.ref) == ("bad_message", "poison")
    delivered = await sub.recv_type(Delivery)
    assert (delivered.id, bytes(delivered.body)) == ("fine", b'"fine"')


async def test_the_largest_publish_accepted_is_delivered_within_max_frame(
    start_server: StartServer, raw: Any
) -> None:
    max_frame = 4096
    server = await start_server(max_frame=max_frame)
    sub = await raw(server.port, "sub")
    sub.send(Join(room="r", id="j"))
    await sub.recv_type(ServerAck)
    pub = await raw(server.port, "pub-with-a-name-of-sixty-four-characters-xxxxxxxxxxxxxxxxxxxxxxx")

    def publish(size: int, msg_id: str) -> bytes:
        frame = Publish(room="r", body=msgspec.Raw(b'"' + b"x" * size + b'"'), id=msg_id)
        return msgspec.json.encode(frame)

    fits = max_frame - DELIVERY_HEADROOM - len(publish(0, "a"))
    assert len(publish(fits, "a")) == max_frame - DELIVERY_HEADROOM
    pub.send(Publish(room="r", body=msgspec.Raw(b'"' + b"x" * (fits + 1) + b'"'), id="b"))
    pub.send(Publish(room="r", body=msgspec.Raw(b'"' + b"x" * fits + b'"'), id="a"))
    assert (await pub.recv_type(Error)).ref == "b"  # one byte too many: refused, not fatal
    delivered = await sub.recv_type(Delivery)
    assert delivered.id == "a"
    assert len(msgspec.json.encode(delivered)) <= max_frame
