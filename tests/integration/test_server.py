"""The server over real TLS on 127.0.0.1, driven by a bare protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from securemsg.core.frames import encode_frame
from securemsg.core.messages import (
    Ack,
    Bye,
    Delivery,
    Direct,
    Error,
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
)
from securemsg.tls.contexts import client_context
from tests.faults import wait_until

pytestmark = pytest.mark.timeout(30)


async def acked_ids(client: Any, count: int) -> list[str]:
    """The ids of the next ``count`` acks, however the server batched them into frames."""
    ids: list[str] = []
    while len(ids) < count:
        ids += (await client.recv_type(ServerAck)).ids
    return ids


def body(value: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(value))


async def test_welcome_carries_session_heartbeat_and_limits(start_server, raw) -> None:
    server = await start_server()
    alice = await raw(server.port, "alice")
    welcome = alice.welcome
    assert isinstance(welcome, Welcome)
    assert welcome.name == "alice" and welcome.resumed is False and welcome.session
    assert welcome.heartbeat.interval == server.config.heartbeat_interval
    assert welcome.max_frame == server.config.max_frame


async def test_a_connection_and_its_session_are_logged_at_info(start_server, raw, unit) -> None:
    # The server builds these lines only when info is written (Server.logs_info, asked at
    # start): structlog's default configuration writes everything, so here they must come.
    server = await start_server()
    with capture_logs() as logs:
        alice = await raw(server.port, "alice")
        await alice.close()
        await wait_until(lambda: not server.connections, within=20 * unit)
    events = [e["event"] for e in logs if e["log_level"] == "info"]
    assert events == ["connection_opened", "session_started", "connection_closed"]


async def test_publish_reaches_every_member_but_the_sender(start_server, raw) -> None:
    server = await start_server()
    alice, bob, carol = [await raw(server.port, n) for n in ("alice", "bob", "carol")]
    for client in (alice, bob, carol):
        client.send(Join(room="lobby", id="j"))
        assert await client.recv_type(ServerAck) == ServerAck(ids=["j"])
    alice.send(Publish(room="lobby", body=body({"n": 1}), id="p1"))
    assert await alice.recv_type(ServerAck) == ServerAck(ids=["p1"])
    for client in (bob, carol):
        message = await client.recv_type(Delivery)
        assert message.room == "lobby" and message.sender == "alice"
        assert decode_body(message.body) == {"n": 1} and message.seq == 1
    alice.send(Ping(id=99))
    assert await alice.recv_type(Pong) == Pong(id=99)  # nothing else queued for the sender


async def test_wildcards_route_by_token(start_server, raw) -> None:
    server = await start_server()
    star, rest, pub = [await raw(server.port, n) for n in ("star", "rest", "pub")]
    star.send(Join(room="sensors.*.temp", id="1"))
    rest.send(Join(room="sensors.>", id="1"))
    await star.recv_type(ServerAck)
    await rest.recv_type(ServerAck)
    pub.send(
        Publish(room="sensors.kitchen.temp", body=body(21)),
        Publish(room="sensors.kitchen.humidity", body=body(40)),
    )
    assert (await star.recv_type(Delivery)).room == "sensors.kitchen.temp"
    got = [(await rest.recv_type(Delivery)).room for _ in range(2)]
    assert got == ["sensors.kitchen.temp", "sensors.kitchen.humidity"]
    star.send(Ping(id=1))
    assert isinstance(await star.recv(), Pong)  # humidity did not reach sensors.*.temp


async def test_publish_to_a_wildcard_is_refused(start_server, raw) -> None:
    server = await start_server()
    alice = await raw(server.port, "alice")
    alice.send_raw(encode_frame(b'{"type":"publish","room":"a.*","body":1,"id":"x1"}'))
    error = await alice.recv_type(Error)
    assert error.code == "bad_message" and error.ref == "x1"
    alice.send(Ping(id=5))
    assert await alice.recv_type(Pong) == Pong(id=5)  # not fatal


async def test_direct_reaches_the_named_user_and_unknown_names_get_an_error(
    start_server, raw
) -> None:
    server = await start_server()
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    alice.send(Direct(to="bob", body=body("hi"), id="d1"))
    assert await alice.recv_type(ServerAck) == ServerAck(ids=["d1"])
    message = await bob.recv_type(Delivery)
    assert (message.sender, message.to, message.room) == ("alice", "bob", None)
    alice.send(Direct(to="nobody", body=body("hi"), id="d2"))
    error = await alice.recv_type(Error)
    assert (error.code, error.ref) == ("no_such_user", "d2")


async def test_request_reply_token_travels_to_the_answer(start_server, raw) -> None:
    server = await start_server()
    svc, asker = await raw(server.port, "svc"), await raw(server.port, "asker")
    svc.send(Join(room="math", id="j"))
    await svc.recv_type(ServerAck)
    asker.send(Publish(room="math", body=body([2, 3]), reply_to="tok-1"))
    request = await svc.recv_type(Delivery)
    assert request.reply_to == "tok-1"
    svc.send(Direct(to=request.sender, body=body(5), re=request.reply_to))
    answer = await asker.recv_type(Delivery)
    assert answer.re == "tok-1" and decode_body(answer.body) == 5


async def test_presence_and_who(start_server, raw) -> None:
    server = await start_server()
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    alice.send(Join(room="lobby", id="j"))
    await alice.recv_type(ServerAck)
    bob.send(Join(room="lobby", id="j"))
    assert await alice.recv_type(Presence) == Presence(room="lobby", name="bob", event="join")
    bob.send(Who(room="lobby", id="w"))
    assert await bob.recv_type(Members) == Members(room="lobby", names=["alice", "bob"], ref="w")
    bob.send(Leave(room="lobby", id="l"))
    assert await alice.recv_type(Presence) == Presence(room="lobby", name="bob", event="leave")
    bob.send(Leave(room="lobby", id="l2"))
    error = await bob.recv_type(Error)
    assert (error.code, error.ref) == ("not_member", "l2")


async def test_resent_id_is_acknowledged_again_but_not_delivered_twice(start_server, raw) -> None:
    server = await start_server()
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    bob.send(Join(room="r", id="j"))
    await bob.recv_type(ServerAck)
    alice.send(Publish(room="r", body=body(1), id="m1"), Publish(room="r", body=body(1), id="m1"))
    assert await acked_ids(alice, 2) == ["m1", "m1"]
    assert (await bob.recv_type(Delivery)).seq == 1
    bob.send(Ping(id=3))
    assert await bob.recv() == Pong(id=3)  # no second copy


async def test_a_join_resent_after_its_leave_does_not_rejoin(start_server, raw) -> None:
    server = await start_server()
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    bob.send(Join(room="r", id="1"), Leave(room="r", id="2"))
    assert await acked_ids(bob, 2) == ["1", "2"]
    bob.send(Join(room="r", id="1"), Leave(room="r", id="2"))  # as after a cut
    assert await acked_ids(bob, 2) == ["1", "2"]
    alice.send(Publish(room="r", body=body(1), id="p"), Who(room="r", id="w"))
    assert await alice.recv_type(Members) == Members(room="r", names=[], ref="w")
    bob.send(Ping(id=3))
    assert await bob.recv() == Pong(id=3)  # no message, no presence


async def test_resume_within_ttl_replays_after_last_seq(start_server, raw) -> None:
    server = await start_server()
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    bob.send(Join(room="r", id="j"))
    await bob.recv_type(ServerAck)
    alice.send(*[Publish(room="r", body=body(i)) for i in range(1, 6)])
    got = [await bob.recv_type(Delivery) for _ in range(5)]
    assert [m.seq for m in got] == [1, 2, 3, 4, 5]
    bob.send(Ack(seq=2))
    token = bob.welcome.session
    await bob.close()
    await asyncio.sleep(0.1)
    alice.send(Publish(room="r", body=body(6), id="p6"))
    await alice.recv_type(ServerAck)
    again = await raw(server.port, "bob", session=token, last_seq=3)
    assert again.welcome.resumed is True and again.welcome.session == token
    replay = [await again.recv_type(Delivery) for _ in range(3)]
    assert [(m.seq, decode_body(m.body)) for m in replay] == [(4, 4), (5, 5), (6, 6)]
    alice.send(Publish(room="r", body=body(7)))  # still a member: rooms survive the resume
    assert (await again.recv_type(Delivery)).seq == 7


async def test_resume_before_the_old_connection_is_noticed_takes_it_over(start_server, raw) -> None:
    server = await start_server()
    bob = await raw(server.port, "bob")
    token = bob.welcome.session
    again = await raw(server.port, "bob", session=token, last_seq=0)
    assert again.welcome.resumed is True
    error = await bob.recv_type(Error)
    assert error.code == "session_taken_over"
    assert await bob.closed()
    with capture_logs() as logs:
        await server.close()
    [stopped] = [e for e in logs if e["event"] == "server_stopped"]
    assert stopped["hellos_accepted"] == 2  # one session, started then resumed


async def test_session_expires_after_ttl_and_resume_starts_fresh(start_server, raw, unit) -> None:
    server = await start_server(session_ttl=2 * unit)
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    alice.send(Join(room="r", id="j"))
    await alice.recv_type(ServerAck)
    bob.send(Join(room="r", id="j"))
    await bob.recv_type(ServerAck)
    await alice.recv_type(Presence)
    token = bob.welcome.session
    with capture_logs() as logs:
        await bob.close()
        left = await alice.recv_type(Presence, timeout=50 * unit)
    assert left == Presence(room="r", name="bob", event="leave")
    assert any(e["event"] == "session_expired" for e in logs)
    again = await raw(server.port, "bob", session=token, last_seq=0)
    assert again.welcome.resumed is False and again.welcome.session != token


async def test_name_held_by_a_connected_session_is_refused(start_server, raw) -> None:
    server = await start_server()
    await raw(server.port, "alice")
    intruder = await raw(server.port)
    intruder.send(Hello(version=2, name="alice"))
    error = await intruder.recv_type(Error)
    assert error.code == "name_taken"
    assert await intruder.closed()


async def test_first_frame_that_is_not_hello_is_refused_and_closed(start_server, raw) -> None:
    server = await start_server()
    client = await raw(server.port)
    client.send(Join(room="r"))
    error = await client.recv()
    assert isinstance(error, Error) and error.code == "bad_message"
    assert await client.closed()


async def test_garbage_json_gets_bad_frame_and_a_close(start_server, raw) -> None:
    server = await start_server()
    client = await raw(server.port, "alice")
    with capture_logs() as logs:
        client.send_raw(b"\x00\x00\x00\x05{nope")
        error = await client.recv_type(Error)
        assert await client.closed()
    assert error.code == "bad_frame"
    assert any(e["event"] == "frame_rejected" and e["code"] == "bad_frame" for e in logs)


async def test_unknown_type_is_answered_and_the_connection_stays(start_server, raw) -> None:
    server = await start_server()
    client = await raw(server.port, "alice")
    client.send_raw(encode_frame(b'{"type":"teleport","id":"t1"}'))
    error = await client.recv_type(Error)
    assert (error.code, error.ref) == ("unknown_type", "t1")
    client.send(Ping(id=7))
    assert await client.recv_type(Pong) == Pong(id=7)


async def test_too_large_length_prefix_is_refused_without_reading_the_body(
    start_server, raw
) -> None:
    server = await start_server(max_frame=1024)
    client = await raw(server.port, "alice")
    client.send_raw((2**32 - 1).to_bytes(4, "big"))  # 4 GiB announced, nothing sent
    error = await client.recv_type(Error)
    assert error.code == "too_large"
    assert await client.closed()


async def test_plaintext_and_http_to_the_tls_port_are_logged_and_closed(start_server) -> None:
    server = await start_server()
    with capture_logs() as logs:
        for payload in (b"hello there\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(payload)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            if payload.startswith(b"GET"):
                assert answer.startswith(b"HTTP/1.1 400")
                head, _, content = answer.partition(b"\r\n\r\n")
                assert f"Content-Length: {len(content)}".encode() in head
    reasons = [e["reason"] for e in logs if e["event"] == "tls_handshake_failed"]
    assert reasons == ["plaintext", "http_request"]


async def test_alpn_offer_without_securemsg_is_refused(start_server, tls_files) -> None:
    server = await start_server()
    ctx = client_context(ca=tls_files.ca_pem)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with capture_logs() as logs, pytest.raises((ssl.SSLError, OSError, EOFError)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=ctx, server_hostname="localhost"
        )
        try:
            await asyncio.wait_for(reader.readexactly(1), 5)
        finally:
            writer.close()
    assert any(e.get("reason") == "alpn_mismatch" for e in logs)


def client_in_memory(ca: Path) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A securemsg client's TLS over memory BIOs, its ClientHello waiting in the outgoing one:
    for tests that write the bytes themselves (in pieces, or then stop)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca=ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return tls, incoming, outgoing


async def test_a_clienthello_in_pieces_is_waited_for_and_every_handshake_is_counted_out(
    start_server, tls_files, unit
) -> None:
    # Before TLS the server reads the first bytes itself (to refuse plaintext, HTTP or a
    # foreign ALPN without TLS work); a ClientHello that comes in pieces must still reach
    # TLS whole, and every way a handshake ends must give its place back (max_connections).
    server = await start_server(handshake_timeout=5 * unit)
    tls, incoming, outgoing = client_in_memory(tls_files.ca_pem)
    hello = outgoing.read()
    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for piece in (hello[:3], hello[3:40], hello[40:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(unit / 2)  # separate reads on the server
        while True:
            incoming.write(await asyncio.wait_for(reader.read(65536), 5))
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
        writer.write(outgoing.read())  # our Finished
        await writer.drain()
        assert tls.version() == "TLSv1.3"
        # Ended before a ClientHello came: a close, and plaintext.
        _, quitter = await asyncio.open_connection("127.0.0.1", server.port)
        quitter.close()
        r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
        w2.write(b"hello there\r\n")
        assert await asyncio.wait_for(r2.read(), 5) == b""
        w2.close()
        await wait_until(lambda: server._pending_handshakes == 0, within=20 * unit)
    writer.close()
    reasons = sorted(e["reason"] for e in logs if e["event"] == "tls_handshake_failed")
    assert reasons == ["eof", "plaintext"]
    assert server.counts["accepted"] == 3
    accepted = [e for e in logs if e["event"] == "connection_opened" and e["log_level"] == "debug"]
    assert len(accepted) == 3  # one per accepted connection, before TLS (docs/operations.md)


async def test_handshakes_in_progress_are_dropped_when_the_server_stops(
    start_server, tls_files, unit
) -> None:
    server = await start_server(handshake_timeout=60.0)  # not what ends them
    _, _, outgoing = client_in_memory(tls_files.ca_pem)
    hello = outgoing.read()
    silent = await asyncio.open_connection("127.0.0.1", server.port)
    halfway = await asyncio.open_connection("127.0.0.1", server.port)
    halfway[1].write(hello)  # the server answers and waits for our Finished
    await wait_until(lambda: server._pending_handshakes == 2, within=20 * unit)
    with capture_logs() as logs:
        await asyncio.wait_for(server.close(), 20 * unit)
        for reader, writer in (silent, halfway):
            with contextlib.suppress(ConnectionError):
                while await asyncio.wait_for(reader.read(65536), 20 * unit):
                    pass  # the server's flight, then the end
            writer.close()
    assert server._pending_handshakes == 0
    assert not [e for e in logs if e["event"] == "tls_handshake_failed"]


async def test_silent_tcp_connection_times_out_and_real_clients_still_work(
    start_server, raw, unit
) -> None:
    server = await start_server(handshake_timeout=3 * unit)
    with capture_logs() as logs:
        silent = socket.create_connection(("127.0.0.1", server.port))
        silent.setblocking(False)
        alice = await raw(server.port, "alice")
        await asyncio.sleep(6 * unit)
        assert alice.welcome.name == "alice"
    silent.close()
    assert any(e["event"] == "tls_handshake_failed" and e["reason"] == "timeout" for e in logs)


async def test_tls_connection_without_hello_gets_handshake_timeout(start_server, raw, unit) -> None:
    server = await start_server(handshake_timeout=3 * unit)
    client = await raw(server.port)
    error = await client.recv(timeout=30 * unit)
    assert isinstance(error, Error) and error.code == "handshake_timeout"
    assert await client.closed()


async def test_heartbeat_timeout_closes_a_client_that_stops_answering(
    start_server, raw, unit
) -> None:
    server = await start_server(heartbeat_interval=1 * unit, heartbeat_timeout=3 * unit)
    client = await raw(server.port, "mute")
    with capture_logs() as logs:
        loop = asyncio.get_running_loop()
        start = loop.time()
        frames: list[Any] = []
        # Read without answering pings: the server must give up after ~heartbeat_timeout.
        async with asyncio.timeout(40 * unit):
            while True:
                data = await client.reader.read(65536)
                if not data:
                    break
                frames.extend(client.decoder.feed(data))
        elapsed = loop.time() - start
    assert any(b"ping" in f for f in frames)
    assert any(b"heartbeat_timeout" in f for f in frames)
    assert 2 * unit < elapsed < 20 * unit
    assert any(e["event"] == "heartbeat_timeout" for e in logs)


async def test_mutual_tls_takes_the_name_from_the_certificate(start_server, raw, tls_files) -> None:
    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    ctx = client_context(ca=tls_files.ca_pem, cert=tls_files.alice_cert, key=tls_files.alice_key)
    alice = await raw(server.port, ctx=ctx)
    welcome = await alice.hello(None)
    assert welcome.name == "alice"
    impostor = await raw(
        server.port,
        ctx=client_context(ca=tls_files.ca_pem, cert=tls_files.bob_cert, key=tls_files.bob_key),
    )
    impostor.send(Hello(version=2, name="alice"))
    error = await impostor.recv()
    assert isinstance(error, Error) and error.code == "unauthorized"
    assert await impostor.closed()


async def test_mutual_tls_rejects_a_certificate_from_another_ca(start_server, tls_files) -> None:
    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    ctx = client_context(
        ca=tls_files.ca_pem, cert=tls_files.intruder_cert, key=tls_files.intruder_key
    )
    with capture_logs() as logs:
        with pytest.raises((ssl.SSLError, OSError, EOFError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=ctx, server_hostname="localhost"
            )
            try:
                await asyncio.wait_for(reader.readexactly(1), 5)
            finally:
                writer.close()
        await asyncio.sleep(0.05)
    assert any(e["event"] == "tls_handshake_failed" for e in logs)


async def test_rate_limit_drops_and_answers_excess_messages(start_server, raw) -> None:
    server = await start_server(max_msgs_per_sec=5)
    alice = await raw(server.port, "alice")
    alice.send(*[Publish(room="r", body=body(i), id=str(i)) for i in range(20)])
    acked: list[str] = []
    limited: list[Error] = []
    while len(acked) + len(limited) < 20:  # acks come in batches, errors one by one
        answer = await alice.recv()
        if isinstance(answer, ServerAck):
            acked += answer.ids
        elif isinstance(answer, Error) and answer.code == "rate_limited":
            limited.append(answer)
    assert len(acked) + len(limited) == 20
    assert 1 <= len(acked) <= 7 and limited[0].ref is not None
    assert set(acked).isdisjoint(error.ref for error in limited)
    alice.send(Ping(id=1))
    assert await alice.recv_type(Pong) == Pong(id=1)


async def test_connections_past_max_connections_are_refused_at_accept(
    start_server, raw, tls_files
) -> None:
    server = await start_server(max_connections=2)
    a, b = await raw(server.port, "a"), await raw(server.port, "b")
    with capture_logs() as logs, pytest.raises((ssl.SSLError, OSError, EOFError)):
        await raw(server.port, "c")
    assert any(e["event"] == "connection_refused" for e in logs)
    a.send(Ping(id=1))
    assert await a.recv_type(Pong) == Pong(id=1)
    await b.close()
    await asyncio.sleep(0.1)
    c = await raw(server.port, "c")
    assert c.welcome.name == "c"


async def test_token_is_required_when_configured(start_server, raw, monkeypatch) -> None:
    server = await start_server(token="s3cret")
    ok = await raw(server.port, "alice", token="s3cret")
    assert isinstance(ok.welcome, Welcome)
    bad = await raw(server.port)
    bad.send(Hello(version=2, name="bob", token="x"))
    error = await bad.recv()
    assert isinstance(error, Error) and error.code == "unauthorized"


async def test_graceful_shutdown_says_bye_after_queued_messages(start_server, raw) -> None:
    server = await start_server()
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    bob.send(Join(room="r", id="j"))
    await bob.recv_type(ServerAck)
    alice.send(*[Publish(room="r", body=body(i)) for i in range(100)])
    alice.send(Publish(room="r", body=body("last"), id="last"))
    await alice.recv_type(ServerAck)
    with capture_logs() as logs:
        await server.close()
    frames = []
    while True:
        frame = await bob.recv()
        frames.append(frame)
        if isinstance(frame, Bye):
            break
    assert frames[-1] == Bye(reason="server_shutdown")
    assert len([f for f in frames if isinstance(f, Delivery)]) == 101
    assert any(e["event"] == "server_stopped" for e in logs)


@pytest.mark.serial
async def test_a_flood_of_tiny_frames_does_not_starve_other_clients(start_server, raw) -> None:
    server = await start_server()
    flooder, alice = await raw(server.port, "flooder"), await raw(server.port, "alice")
    loop = asyncio.get_running_loop()
    flood = b"".join(encode_frame(b'{"type":"ping","id":%d}' % i) for i in range(50_000))
    drain = asyncio.ensure_future(flooder.reader.read(-1))
    flooder.send_raw(flood)
    delays = []
    for i in range(30):
        start = loop.time()
        alice.send(Ping(id=i))
        assert await alice.recv_type(Pong) == Pong(id=i)
        delays.append(loop.time() - start)
    drain.cancel()
    delays.sort()
    assert delays[int(len(delays) * 0.99) - 1] < 0.2, delays


async def test_a_rate_below_one_per_second_still_lets_a_message_through(start_server, raw) -> None:
    server = await start_server(max_msgs_per_sec=0.5)
    alice = await raw(server.port, "alice")
    alice.send(Publish(room="r", body=body(1), id="a"), Publish(room="r", body=body(2), id="b"))
    # The error goes out at once; the ack may be held back and follow it.
    answers = [await alice.recv(), await alice.recv()]
    assert ServerAck(ids=["a"]) in answers
    error = next(a for a in answers if isinstance(a, Error))
    assert (error.code, error.ref) == ("rate_limited", "b")


async def test_the_close_log_names_the_client_after_a_bye(start_server, raw) -> None:
    server = await start_server()
    alice = await raw(server.port, "alice")
    with capture_logs() as logs:
        alice.send(Bye(reason="done"))
        assert await alice.recv_type(Bye) == Bye(reason="client_bye")
        assert await alice.closed()
        await asyncio.sleep(0.05)
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert closed and closed[0]["name"] == "alice"


async def test_acks_are_batched_and_held_until_another_frame_goes_out(start_server, raw) -> None:
    server = await start_server()
    alice = await raw(server.port, "alice")
    alice.send(*[Publish(room="r", body=body(i), id=str(i)) for i in range(500)])
    frames = 0
    ids: list[str] = []
    while len(ids) < 500:
        ids += (await alice.recv_type(ServerAck)).ids
        frames += 1
    assert ids == [str(i) for i in range(500)], "every id once, in the order received"
    assert frames <= 50, f"{frames} ack frames for 500 publishes"
    # A publish and a ping in one write: the ack is held and rides with the pong.
    alice.send(Publish(room="r", body=body("x"), id="x"), Ping(id=9))
    assert [await alice.recv(), await alice.recv()] == [Pong(id=9), ServerAck(ids=["x"])]
    # Alone, it still comes (after the hold).
    alice.send(Publish(room="r", body=body("y"), id="y"))
    assert await alice.recv() == ServerAck(ids=["y"])
