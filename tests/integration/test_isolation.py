"""No client can harm another (issue 11), over real TLS: bodies that some client could not
decode are refused at the publisher, with the request's id, and the room carries on."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from securemsg.core.gatekeeper import DELIVERY_HEADROOM
from securemsg.core.messages import Delivery, Error, Hello, Join, Publish, ServerAck
from securemsg.tls.contexts import client_context
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


# -- identity: a presented certificate binds the name, and every name follows the rule --------


async def test_a_verified_certificate_binds_the_name_without_required_mutual_tls(
    start_server: StartServer, raw: Any, tls_files: Any
) -> None:
    server = await start_server(ca=str(tls_files.ca_pem))  # client certificates optional
    alice_ctx = client_context(
        ca=tls_files.ca_pem, cert=tls_files.alice_cert, key=tls_files.alice_key
    )
    impostor = await raw(server.port, ctx=alice_ctx)
    impostor.send(Hello(version=2, name="bob"))
    refusal = await impostor.recv()
    assert isinstance(refusal, Error) and refusal.code == "unauthorized"
    assert await impostor.closed()
    alice = await raw(server.port, None, ctx=alice_ctx)
    assert (await alice.hello(None)).name == "alice"
    # Without a certificate a client still claims its name, as before.
    assert (await (await raw(server.port)).hello("bob")).name == "bob"


@pytest.mark.parametrize("common_name", ["Alice Smith <ops>", "eve\nbob: hi\x1b[2K"])
async def test_a_certificate_name_outside_the_name_rule_is_refused(
    start_server: StartServer, raw: Any, tls_files: Any, tmp_path: Any, common_name: str
) -> None:
    leaf = tls_files.ca.issue_cert(common_name=common_name)
    cert, key = tmp_path / "odd.pem", tmp_path / "odd.key"
    leaf.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    client = await raw(server.port, ctx=client_context(ca=tls_files.ca_pem, cert=cert, key=key))
    with capture_logs() as logs:
        client.send(Hello(version=2))
        refusal = await client.recv()
        assert await client.closed()
    assert isinstance(refusal, Error) and refusal.code == "unauthorized"
    assert "not a valid name" in refusal.message
    assert [e["code"] for e in logs if e["event"] == "session_refused"] == ["unauthorized"]
