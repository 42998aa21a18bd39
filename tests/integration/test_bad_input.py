"""Bad input and hostile peers: each gets a clear error, and nobody else loses anything.

In every test two well-behaved clients (:class:`Bystanders`) chat through the server while
the bad input arrives; at the end every message between them must have arrived exactly once,
in order. Each test prints its figure (``FIGURE {...}``, see :func:`tests.faults.record_figure`).

Cases already covered elsewhere and not repeated here (``docs/reliability.md`` lists them):
plaintext and HTTP to the TLS port, a 4 GiB length prefix, garbage JSON, an unknown type, one
silent TCP connection, a TLS connection that never says hello, a slow consumer cut off, a
flood of 50,000 pings and two connections past ``max_connections`` are in
``test_server.py``; a wrong CA, a wrong host name and a client certificate from another CA are
in ``test_client.py`` and ``test_tls.py``.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from structlog.testing import capture_logs

from securemsg.client.client import Client, connect
from securemsg.core.frames import encode_frame
from securemsg.core.messages import Error, Join, Ping, Pong, Publish, ServerAck
from securemsg.errors import AuthError, ConnectError, TLSError
from securemsg.tls.contexts import client_context
from tests.faults import ServerProcess, peak_rss, record_figure, wait_until
from tests.integration.conftest import OpenClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def open_client(open_client: OpenClient, unit: float) -> OpenClient:
    """The shared clients, with more time to connect (the server may be under attack)."""

    def open_(port: int, name: str | None, **options: Any) -> Awaitable[Client]:
        options.setdefault("reconnect_base", 0.05)
        options.setdefault("connect_timeout", 50 * unit)
        return open_client(port, name, **options)

    return open_


_started: list[Bystanders] = []


@pytest.fixture(autouse=True)
async def _stop_bystanders() -> AsyncIterator[None]:
    """A failed test leaves no chatting task behind."""
    yield
    while _started:
        _started.pop().cancel()
    await asyncio.sleep(0)


class Bystanders:
    """alice publishes numbered messages every few milliseconds; bob, joined to the room,
    records each one and how long it took. :meth:`finish` audits the stream."""

    def __init__(self, alice: Client, bob: Client) -> None:
        self.alice, self.bob = alice, bob
        self.loop = asyncio.get_running_loop()
        self.sent = 0
        self.received: list[int] = []
        self.latencies: list[float] = []
        self._chat = asyncio.ensure_future(self._publish())
        self._listen = asyncio.ensure_future(self._receive())

    @classmethod
    async def start(cls, open_client: OpenClient, port: int, **options: Any) -> Bystanders:
        alice_options = options.pop("alice", {})
        bob_options = options.pop("bob", {})
        bob = await open_client(port, "bob", **options, **bob_options)
        await bob.join("bystanders")
        alice = await open_client(port, "alice", **options, **alice_options)
        bystanders = cls(alice, bob)
        _started.append(bystanders)
        return bystanders

    def cancel(self) -> None:
        self._chat.cancel()
        self._listen.cancel()

    async def _publish(self) -> None:
        for n in range(100_000):  # one every 5 ms: more than any test lasts
            await self.alice.publish("bystanders", [n, self.loop.time()])
            self.sent = n + 1
            await asyncio.sleep(0.005)

    async def _receive(self) -> None:
        for _ in range(100_000):
            message = await self.bob.receive()
            n, sent_at = message.body
            self.received.append(n)
            self.latencies.append(self.loop.time() - sent_at)

    async def finish(self, within: float = 10.0) -> dict[str, Any]:
        """Stop talking, let everything arrive, and check that it all did, once, in order."""
        self._chat.cancel()
        await asyncio.gather(self._chat, return_exceptions=True)
        await self.alice.flush(timeout=within)
        await wait_until(lambda: len(self.received) >= self.sent, within=within)
        await asyncio.sleep(0.05)  # room for a duplicate to show up
        self._listen.cancel()
        await asyncio.gather(self._listen, return_exceptions=True)
        latencies = sorted(self.latencies)
        stats = {
            "bystander_messages": self.sent,
            "bystander_lost": len(set(range(self.sent)) - set(self.received)),
            "bystander_duplicated": len(self.received) - len(set(self.received)),
            "bystander_p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 4),
            "bystander_max_latency_s": round(latencies[-1], 4),
        }
        assert self.sent > 0
        assert self.received == list(range(self.sent)), "bystanders lost or reordered messages"
        return stats


def write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> tuple[str, str]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    return str(cert), str(key)


def client_hello(ca: Path) -> bytes:
    """The bytes of a real securemsg ClientHello, made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca=ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def ended(reader: asyncio.StreamReader, within: float) -> str:
    """Read until the server ends the connection: "eof" or "reset"."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        return "reset"
    return "eof"


# -- before the protocol: slowloris ------------------------------------------------------------


async def test_two_hundred_stalled_tls_handshakes_do_not_keep_a_client_out(
    start_server, open_client, tls_files, unit
) -> None:
    handshake_timeout = 10 * unit
    server = await start_server(handshake_timeout=handshake_timeout)
    loop = asyncio.get_running_loop()
    bystanders = await Bystanders.start(open_client, server.port)
    hello = client_hello(tls_files.ca_pem)
    with capture_logs() as logs:
        opened = loop.time()
        stalled = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(200)]
        for index, (_, writer) in enumerate(stalled):
            # Half of them stop inside their ClientHello, half after it (the server answered).
            writer.write(hello[: len(hello) // 2] if index % 2 else hello)
        await asyncio.sleep(unit)
        assert server._pending_handshakes >= 190  # they are all waiting on the server
        started = loop.time()
        newcomer = await open_client(server.port, "newcomer")
        connect_time = loop.time() - started
        await newcomer.join("bystanders")  # and chats: it hears alice, and is answered
        assert (await newcomer.receive(timeout=20 * unit)).sender == "alice"
        await newcomer.publish("elsewhere", "hello", confirm=True, timeout=20 * unit)
        ends = await asyncio.gather(*(ended(reader, 30 * unit) for reader, _ in stalled))
        dropped_after = loop.time() - opened
        timeouts = sum(
            1 for e in logs if e["event"] == "tls_handshake_failed" and e["reason"] == "timeout"
        )
    for _, writer in stalled:
        writer.close()
    stats = await bystanders.finish()
    record_figure(
        "slowloris: 200 stalled TLS handshakes",
        stalled=len(stalled),
        newcomer_connect_s=round(connect_time, 3),
        all_dropped_after_s=round(dropped_after, 3),
        ended_by={end: ends.count(end) for end in set(ends)},
        handshake_timeout_s=round(handshake_timeout, 3),
        logged_timeouts=timeouts,
        **stats,
    )
    assert timeouts == 200 and set(ends) <= {"eof", "reset"}
    assert dropped_after <= handshake_timeout + 20 * unit
    assert connect_time < handshake_timeout  # let in while the 200 were still waiting


# -- certificates and names ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_certificates(tls_files: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("odd")
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    past = {"not_before": now - 30 * day, "not_after": now - day}
    return {
        "expired_server": write_leaf(
            directory, "expired-server", tls_files.ca.issue_cert("localhost", **past)
        ),
        "expired_client": write_leaf(
            directory, "expired-client", tls_files.ca.issue_cert(common_name="carol", **past)
        ),
    }


async def test_an_expired_server_certificate_is_a_tls_error_expired(
    start_server, tls_files, odd_certificates
) -> None:
    cert, key = odd_certificates["expired_server"]
    server = await start_server(cert=cert, key=key)
    with pytest.raises(TLSError) as caught:
        await connect("localhost", server.port, ca=str(tls_files.ca_pem), name="alice")
    record_figure("expired server certificate", check=caught.value.check, error=str(caught.value))
    assert caught.value.check == "expired"
    assert "validity" in str(caught.value)


MUTUAL_CASES = {
    # case: (client certificate, name claimed, error type, its check or code)
    "expired client certificate": ("expired_client", None, TLSError, "client_certificate"),
    "no client certificate": (None, "carol", ConnectError, None),
    "name differs from the certificate": ("bob", "carol", AuthError, "unauthorized"),
}


@pytest.mark.parametrize("case", list(MUTUAL_CASES))
async def test_mutual_tls_refusals_are_one_clear_sentence_and_bystanders_carry_on(
    start_server, open_client, tls_files, odd_certificates, unit, case: str
) -> None:
    identity, name, kind, detail = MUTUAL_CASES[case]
    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    bystanders = await Bystanders.start(
        open_client,
        server.port,
        alice={"cert": str(tls_files.alice_cert), "key": str(tls_files.alice_key)},
        bob={"cert": str(tls_files.bob_cert), "key": str(tls_files.bob_key)},
    )
    files: dict[str, Any] = {}
    if identity == "bob":
        files = {"cert": str(tls_files.bob_cert), "key": str(tls_files.bob_key)}
    elif identity is not None:
        cert, key = odd_certificates[identity]
        files = {"cert": cert, "key": key}
    with capture_logs() as logs, pytest.raises(ConnectError) as caught:
        await connect(
            "localhost", server.port, ca=str(tls_files.ca_pem), name=name, **files,
            connect_timeout=20 * unit,
        )  # fmt: skip
    await asyncio.sleep(0.05)
    error = caught.value
    logged = [
        e.get("reason") or e.get("code")
        for e in logs
        if e["event"] in ("tls_handshake_failed", "session_refused")
    ]
    stats = await bystanders.finish()
    record_figure(
        f"mutual TLS: {case}",
        error_type=type(error).__name__,
        check=getattr(error, "check", None) or getattr(error, "code", None),
        error=str(error),
        server_logged=logged,
        **stats,
    )
    assert type(error) is kind
    assert f"localhost:{server.port}" in str(error)  # names the server
    if kind is TLSError:
        assert error.check == detail  # type: ignore[attr-defined]
    elif kind is AuthError:
        assert error.code == detail  # type: ignore[attr-defined]
        assert "certificate" in str(error)
    else:
        assert "--cert" in str(error)  # the hint: this server wants a client certificate
    assert logged, "the server logged why it refused"


# -- bad frames -----------------------------------------------------------------------------------

BAD_FRAMES = {
    # case: (bytes after hello, expected error code, does the connection survive?)
    "zero length prefix": (b"\x00\x00\x00\x00", "bad_frame", False),
    "invalid UTF-8": (encode_frame(b'{"type":"ping","id":1,"x":"\xff\xfe"}'), "bad_frame", False),
    "JSON that is not an object": (encode_frame(b"[1, 2, 3]"), "bad_frame", False),
    "missing fields": (encode_frame(b'{"type":"publish","id":"m1"}'), "bad_message", True),
    "wrong field type": (encode_frame(b'{"type":"join","room":5,"id":"j1"}'), "bad_message", True),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_bad_frames_get_an_error_frame_and_bystanders_carry_on(
    start_server, open_client, raw, case: str
) -> None:
    data, code, survives = BAD_FRAMES[case]
    server = await start_server()
    bystanders = await Bystanders.start(open_client, server.port)
    client = await raw(server.port, "mallory")
    with capture_logs() as logs:
        client.send_raw(data)
        error = await client.recv_type(Error)
        if survives:
            client.send(Ping(id=1))
            assert await client.recv_type(Pong) == Pong(id=1)
        else:
            assert await client.closed()
    stats = await bystanders.finish()
    rejected = [e for e in logs if e["event"] == "frame_rejected"]
    record_figure(
        f"bad frame: {case}",
        code=error.code,
        message=error.message,
        connection_kept=survives,
        **stats,
    )
    assert error.code == code
    assert rejected and rejected[0]["code"] == code and rejected[0]["fatal"] is not survives


async def test_a_truncated_frame_then_close_is_logged_and_forgotten(
    start_server, open_client, raw, unit
) -> None:
    server = await start_server()
    bystanders = await Bystanders.start(open_client, server.port)
    client = await raw(server.port, "mallory")
    with capture_logs() as logs:
        client.send_raw((100).to_bytes(4, "big") + b'{"type":"pi')  # 11 of 100 bytes
        await asyncio.sleep(unit)
        await client.close()
        await wait_until(lambda: len(server.connections) == 2, within=20 * unit)
    closed = next(e for e in logs if e["event"] == "connection_closed")
    stats = await bystanders.finish()
    record_figure(
        "truncated frame, then close",
        reason=closed["reason"],
        bytes_in=closed["bytes_in"],
        connections_left=len(server.connections),
        **stats,
    )
    assert closed["name"] == "mallory"
    assert "mallory" in server.broker.by_name  # its session is kept for a resume, as any
    assert server.broker.by_name["mallory"].link is None


async def test_a_ten_megabyte_body_is_refused_at_its_header(
    start_server, open_client, raw, unit
) -> None:
    server = await start_server()
    bystanders = await Bystanders.start(open_client, server.port)
    # The library refuses it before it leaves: the server's max_frame came with welcome.
    big = "x" * (10 * 1024 * 1024)
    with pytest.raises(ValueError, match="exceeds the server's max_frame"):
        await bystanders.alice.publish("bystanders", big)
    # A raw client that sends it anyway is answered too_large from the 4-byte header alone.
    client = await raw(server.port, "mallory")
    frame = encode_frame(msgspec.json.encode({"type": "publish", "room": "r", "body": big}))
    with capture_logs() as logs:
        client.send_raw(frame)
        try:
            error = await client.recv_type(Error, timeout=20 * unit)
            answered = error.code
        except (ConnectionResetError, EOFError):
            answered = "reset before the error could be read"
        assert await client.closed()
    rejected = next(e for e in logs if e["event"] == "frame_rejected")
    stats = await bystanders.finish()
    record_figure(
        "10 MB body",
        frame_bytes=len(frame),
        server_max_frame=server.config.max_frame,
        answered=answered,
        server_logged=rejected["code"],
        **stats,
    )
    assert rejected["code"] == "too_large" and rejected["fatal"] is True
    assert answered in ("too_large", "reset before the error could be read")


async def test_a_burst_of_100000_tiny_publishes_is_routed_in_order_and_bystanders_carry_on(
    start_server, open_client, raw, unit
) -> None:
    count = 100_000
    # A subscriber of the flood must be allowed that many unacknowledged messages: with the
    # default max_pending (10,000) it is cut off as a slow consumer and told of the gap.
    server = await start_server(max_pending=2 * count)
    bystanders = await Bystanders.start(open_client, server.port)
    sink = await open_client(server.port, "sink")
    await sink.join("flood")
    flooder = await raw(server.port, "flooder")
    loop = asyncio.get_running_loop()
    burst = b"".join(
        encode_frame(b'{"type":"publish","room":"flood","body":%d}' % n) for n in range(count)
    )

    async def drain() -> list[Any]:
        return [(await sink.receive(timeout=100 * unit)).body for _ in range(count + 1)]

    draining = asyncio.create_task(drain())
    started = loop.time()
    flooder.send_raw(burst)
    flooder.send(Publish(room="flood", body=msgspec.Raw(b"-1"), id="last"))
    assert await flooder.recv_type(ServerAck, timeout=100 * unit) == ServerAck(ids=["last"])
    routed = loop.time() - started
    got = await draining
    delivered = loop.time() - started
    stats = await bystanders.finish()
    record_figure(
        "100,000 tiny frames in a burst",
        frames=count,
        burst_bytes=len(burst),
        routed_s=round(routed, 3),
        delivered_to_a_client_s=round(delivered, 3),
        **stats,
    )
    assert got == [*range(count), -1]
    assert stats["bystander_max_latency_s"] < 30 * unit


# -- memory and connection limits -------------------------------------------------------------


MAX_OUTGOING, MAX_PENDING, SIZE, COUNT = 1024 * 1024, 2000, 4096, 10_000


async def _firehose(
    tls_files: Any, open_client: OpenClient, unit: float, *, stuck_client: bool
) -> dict[str, Any]:
    """A server in a subprocess streams COUNT messages of SIZE bytes to a reader that keeps
    up and, if ``stuck_client``, to one that never reads; returns its peak RSS growth."""
    server = ServerProcess(
        [
            "--cert", str(tls_files.server_cert), "--key", str(tls_files.server_key),
            "--max-outgoing-bytes", str(MAX_OUTGOING), "--max-pending", str(MAX_PENDING),
            # The stuck client holds the publisher back (flow control) until it is cut.
            "--slow-consumer-timeout", str(20 * unit),
        ]
    )  # fmt: skip
    port = await asyncio.to_thread(server.start)
    try:
        assert server.proc is not None
        bystanders = await Bystanders.start(open_client, port)
        reader = await open_client(port, "reader")
        await reader.join("firehose")
        if stuck_client:
            _, stuck = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(ca=tls_files.ca_pem),
                server_hostname="localhost",
            )  # fmt: skip
            sock = stuck.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hello = {"type": "hello", "version": 2, "name": "stuck"}
            stuck.write(encode_frame(msgspec.json.encode(hello)))
            stuck.write(encode_frame(msgspec.json.encode(Join(room="firehose", id="j"))))
            await wait_until(lambda: "stuck" in str(server.events()), within=50 * unit)
            await asyncio.sleep(2 * unit)
            stuck.transport.pause_reading()  # and never reads again
        baseline = peak_rss(server.proc.pid)
        publisher = await open_client(port, "publisher")

        async def read_all() -> int:
            for _ in range(COUNT):
                await reader.receive(timeout=100 * unit)
            return COUNT

        reading = asyncio.create_task(read_all())
        body = "x" * SIZE
        for n in range(COUNT):
            await publisher.publish("firehose", body)
            if n % 100 == 99:  # bursts of 400 KB, under max_outgoing_bytes: a reader keeps up
                await publisher.flush(timeout=300 * unit)
        got = await reading
        peak = peak_rss(server.proc.pid)
        stats = await bystanders.finish()
        if stuck_client:
            stuck.transport.abort()
    finally:
        server.kill()
    cut_off = [
        e["event"]
        for e in server.events()
        if e.get("event") in ("slow_consumer", "session_overflowed") and e.get("name") == "stuck"
    ]
    return {"growth": peak - baseline, "peak": peak, "got": got, "cut_off": cut_off, **stats}


async def test_a_client_that_never_reads_keeps_server_memory_bounded(
    tls_files, open_client, unit
) -> None:
    alone = await _firehose(tls_files, open_client, unit, stuck_client=False)
    stuck = await _firehose(tls_files, open_client, unit, stuck_client=True)
    limits = MAX_OUTGOING + MAX_PENDING * SIZE
    extra = stuck["growth"] - alone["growth"]
    record_figure(
        "client that never reads: server memory",
        published_bytes=COUNT * SIZE,
        max_outgoing_bytes=MAX_OUTGOING,
        max_pending=MAX_PENDING,
        message_bytes=SIZE,
        configured_limit_bytes=limits,
        peak_rss_growth_without_it_bytes=alone["growth"],
        peak_rss_growth_with_it_bytes=stuck["growth"],
        extra_for_the_stuck_client_bytes=extra,
        peak_rss_bytes=stuck["peak"],
        stuck_client_cut_off_by=stuck["cut_off"],
        reader_received=stuck["got"],
        **{k: v for k, v in stuck.items() if k.startswith("bystander")},
    )
    assert stuck["got"] == alone["got"] == COUNT  # the reader that keeps up got everything
    assert stuck["cut_off"], "the client that never reads was cut off"
    assert extra < 2 * limits  # what it costs is bounded by the configuration...
    assert stuck["growth"] < COUNT * SIZE / 2  # ...and far below what was published


async def test_a_connection_flood_past_max_connections_is_refused_and_those_inside_carry_on(
    start_server, open_client, tls_files, unit
) -> None:
    limit, inside, flood = 50, 40, 200
    server = await start_server(max_connections=limit)
    bystanders = await Bystanders.start(open_client, server.port)
    idle = [await open_client(server.port, f"idle{i:02}") for i in range(inside)]
    context = client_context(ca=tls_files.ca_pem)

    hold = asyncio.Event()  # the intruders that get in stay until all have tried
    tried: list[str] = []

    async def intruder() -> str:
        try:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=context, server_hostname="localhost"
            )
        except (OSError, ssl.SSLError, EOFError) as exc:
            tried.append(type(exc).__name__)
            return tried[-1]
        tried.append("connected")
        await hold.wait()
        writer.close()
        return "connected"

    with capture_logs() as logs:
        intruders = [asyncio.ensure_future(intruder()) for _ in range(flood)]
        await wait_until(lambda: len(tried) == flood, within=100 * unit)
        hold.set()
        outcomes = await asyncio.gather(*intruders)
        refused = sum(1 for e in logs if e["event"] == "connection_refused")
        # The intruders that got in hang up; then the server is filled to the brim, and a
        # securemsg client turned away says so in one sentence (and may retry later).
        await wait_until(lambda: len(server.connections) == inside + 2, within=50 * unit)
        with pytest.raises(ConnectError) as caught:
            while len(server.connections) < limit:
                await open_client(server.port, f"filler{len(server.connections)}")
            await connect(
                "localhost", server.port, ca=str(tls_files.ca_pem), name="late",
                connect_timeout=20 * unit,
            )  # fmt: skip
    await idle[0].who("bystanders")  # those inside still get answers
    stats = await bystanders.finish()
    record_figure(
        "connection flood past max_connections",
        max_connections=limit,
        inside=inside + 2,
        flood=flood,
        flood_connected=outcomes.count("connected"),
        flood_refused_logged=refused,
        refused_client_error=str(caught.value),
        **stats,
    )
    room = limit - inside - 2
    assert outcomes.count("connected") == room  # up to the limit, and not one more
    assert refused == flood - room  # every other one, at accept
    assert type(caught.value) is ConnectError
    # A reset when the ClientHello was already in (the usual case), else a close.
    assert any(w in str(caught.value) for w in ("reset the connection", "closed the connection"))
