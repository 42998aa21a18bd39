"""No client can harm another (issue 11), over real TLS: bodies that some client could not
decode are refused at the publisher, with the request's id, and the room carries on."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from securemsg.core.frames import encode_frame
from securemsg.core.gatekeeper import DELIVERY_HEADROOM
from securemsg.core.messages import (
    Delivery,
    Error,
    Hello,
    Join,
    Leave,
    Members,
    Ping,
    Pong,
    Publish,
    ServerAck,
    Who,
    encode_frame_of,
)
from securemsg.server.connection import LOGGED_FAULTS
from securemsg.tls.contexts import client_context
from tests.faults import record_figure
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


# -- logs and echoes that cannot be inflated --------------------------------------------------


async def test_a_huge_unknown_type_is_neither_logged_nor_echoed_whole(
    start_server: StartServer, raw: Any
) -> None:
    # Issue 11: 20 frames of a ~1 MiB `type` made 19.1 MiB of log and 19.1 MiB echoed.
    server = await start_server(max_frame=1 << 20)
    client = await raw(server.port, "mallory")
    huge = "x" * ((1 << 20) - 6000)
    frame = encode_frame(b'{"type":"' + huge.encode() + b'","id":"' + b"i" * 5000 + b'"}')
    with capture_logs() as logs:
        for _ in range(20):
            client.send_raw(frame)
        errors = [await client.recv_type(Error, timeout=10) for _ in range(20)]
    echoed = sum(len(encode_frame_of(error)) for error in errors)
    logged = sum(len(repr(entry)) for entry in logs)
    record_figure("20 frames with a 1 MiB unknown type", echoed_bytes=echoed, logged_bytes=logged)
    assert {error.code for error in errors} == {"unknown_type"}
    assert echoed < 20 * 300, echoed
    assert logged < 20 * 1000, logged
    assert all(error.ref is None for error in errors)  # an id past 128 characters is no ref


async def test_repeated_faults_are_logged_a_few_times_then_summed_up_and_the_connection_closed(
    start_server: StartServer, raw: Any
) -> None:
    server = await start_server(max_invalid_frames=30)
    client = await raw(server.port, "mallory")
    with capture_logs() as logs:
        client.send_raw(encode_frame(b'{"type":"nonsense"}') * 40)
        errors = []
        with contextlib.suppress(EOFError):
            while True:
                errors.append(await client.recv_type(Error, timeout=5))
        await asyncio.sleep(0.05)
    # Frames read with the 30th were answered already: the close comes after them.
    *answered, last = errors
    assert 30 <= len(answered) <= 40 and {e.code for e in answered} == {"unknown_type"}
    assert last.code == "bad_frame" and "30 invalid frames" in last.message
    rejected = [e for e in logs if e["event"] == "frame_rejected"]
    assert len(rejected) == LOGGED_FAULTS + 1  # the first ones, and the one that closes
    [summary] = [e for e in logs if e["event"] == "faults_not_logged"]
    assert summary["count"] == 30 - LOGGED_FAULTS
    [closed] = [e for e in logs if e["event"] == "connection_closed"]
    assert closed["reason"] == "bad_frame"


# -- bounded answers --------------------------------------------------------------------------


async def test_who_on_a_room_too_large_for_one_frame_is_answered_cut_and_says_so(
    start_server: StartServer, raw: Any, open_client: Any
) -> None:
    server = await start_server(max_frame=4096)
    names = [f"{index:03d}" + "n" * 61 for index in range(80)]  # ~5.4 KB of names
    for name in names:
        member = await raw(server.port, name)
        member.send(Join(room="crowd", id="j"))
        await member.recv_type(ServerAck)
        await member.close()  # its session stays, disconnected
    client = await open_client(server.port, "asker")
    found = await client.who("crowd")
    assert getattr(found, "truncated", False) is True
    assert 40 < len(found) < 80 and found == names[: len(found)]
    assert getattr(await client.who("nobody"), "truncated", False) is False


async def test_a_client_that_never_reads_its_answers_is_held_to_max_outgoing_bytes(
    start_server: StartServer, raw: Any
) -> None:
    """A ``who`` is a 40-byte request with an answer of up to ``max_frame``: a client that
    asks and never reads must not make the server buffer its answers without bound. Its
    requests wait (TCP pushes back on it); once it reads, every answer comes, in order."""
    limit = 64 * 1024
    server = await start_server(max_outgoing_bytes=limit)
    port = server.port
    for i in range(60):  # 60 names of 64 characters: a `members` frame of ~4 KB
        member = await raw(port, f"{i:02d}".ljust(64, "m"))
        member.send(Join(room="big", id="j"))
        await member.recv_type(ServerAck)
    greedy = await raw(port, "greedy")
    asked = 5_000  # ~20 MB of answers, more than loopback's socket buffers hold
    greedy.send_raw(b"".join(encode_frame_of(Who(room="big", id=str(i))) for i in range(asked)))
    (conn,) = [c for c in server.connections if c.session and c.session.name == "greedy"]
    bystander = await raw(port, "bystander")
    most = 0
    for _ in range(40):  # 2 s at most for the server to read all it will read
        await asyncio.sleep(0.05)
        assert conn.transport is not None
        most = max(most, conn.transport.get_write_buffer_size())
    record_figure("who_never_read", most_buffered=most, asked=asked)
    # One chunk of answers past the limit, and one answer: whatever the client asked.
    assert most <= limit + 64 * 1024 + 8 * 1024, f"{most} bytes buffered for the client"
    bystander.send(Ping(id=1))
    assert isinstance(await bystander.recv_type(Pong), Pong)  # the others carry on
    answered = []
    while len(answered) < asked:
        frame = await greedy.recv_type(Members, timeout=10)
        assert len(frame.names) == 60
        answered.append(frame.ref)
    assert answered == [str(i) for i in range(asked)]


async def test_a_join_and_leave_flood_writes_no_log_line_at_info(
    start_server: StartServer, raw: Any
) -> None:
    """Each join or leave logged at info was 167 bytes of log: a client toggling one room
    could fill the server's disk as fast as it could send. They are logged at debug."""
    server = await start_server()
    client = await raw(server.port, "toggler")
    with capture_logs() as logs:
        client.send_raw(
            b"".join(
                encode_frame_of(Join(room="r", id=f"j{i}"))
                + encode_frame_of(Leave(room="r", id=f"l{i}"))
                for i in range(200)
            )
            + encode_frame_of(Who(room="r", id="end"))
        )
        await client.recv_type(Members)
    toggles = [log for log in logs if log["event"] in {"joined", "left"}]
    assert len(toggles) == 400
    assert {log["log_level"] for log in toggles} == {"debug"}
