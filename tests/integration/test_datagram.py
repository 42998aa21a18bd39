"""The datagram channel over real UDP on 127.0.0.1: DTLS 1.2 with trustme certificates."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from securemsg import datagram
from securemsg.bench.lossy import Impairment, UdpProxy
from securemsg.client.datagram import DatagramClient
from securemsg.core.datagram import MAX_UDP_PAYLOAD, parse_client_hello
from securemsg.errors import AuthError, ClosedError, TimeoutError, TLSError
from securemsg.server.server import Server
from securemsg.tls.dtls import PeerCheck, client_dtls_context
from tests.integration.conftest import OpenClient, StartServer


@pytest.fixture
async def dtls(tls_files: Any) -> Any:
    """Open datagram clients that trust the test CA; closed at the end."""
    clients: list[DatagramClient] = []

    async def open_(port: int, name: str | None = "probe", **options: Any) -> DatagramClient:
        options.setdefault("ca", str(tls_files.ca_pem))
        options.setdefault("timeout", 5.0)
        host = options.pop("host", "localhost")
        client = await datagram.connect(host, port, name=name, **options)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


def udp_port(server: Server) -> int:
    assert server.datagram is not None
    return server.datagram.port


def first_flight(ca: Path) -> bytes:
    """A real DTLS ClientHello (without a cookie), as a client's first datagram."""
    context = client_dtls_context(ca=str(ca), cert=None, key=None, check=PeerCheck("localhost"))
    conn = SSL.Connection(context, None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(MAX_UDP_PAYLOAD)
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.3)
    return sock


def answers(sock: socket.socket) -> list[bytes]:
    got = []
    for _ in range(1000):
        try:
            got.append(sock.recv(65536))
        except OSError:  # the timeout: nothing more came
            return got
    return got


# -- the handshake ---------------------------------------------------------------------------


async def test_a_client_verifies_the_server_and_the_listener_shares_the_tls_port_number(
    start_server: StartServer, dtls: Any
) -> None:
    server = await start_server()
    assert udp_port(server) == server.port
    client = await dtls(server.port)
    assert client.name == "probe"
    assert 0 < client.handshake_time < 5
    assert await client.ping() < 5
    assert server.datagram is not None
    assert server.datagram.counts["cookies_sent"] == 1  # stateless cookie first


async def test_a_client_refuses_a_server_signed_by_another_ca(
    start_server: StartServer, dtls: Any, tls_files: Any
) -> None:
    server = await start_server()
    with pytest.raises(TLSError) as caught:
        await dtls(server.port, ca=str(tls_files.other_ca_pem))
    assert caught.value.check == "unknown_authority"
    # The server is still serving.
    await dtls(server.port)


async def test_a_client_refuses_a_certificate_for_another_host_name(
    start_server: StartServer, dtls: Any, tls_files: Any, tmp_path: Path
) -> None:
    leaf = tls_files.ca.issue_cert("elsewhere.example")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "elsewhere.pem"))
    server = await start_server(cert=str(tmp_path / "elsewhere.pem"), key=None)
    with pytest.raises(TLSError) as caught:
        await dtls(server.port, host="127.0.0.1")
    assert caught.value.check == "hostname_mismatch"
    assert "elsewhere.example" in str(caught.value)


async def test_the_datagram_listener_can_be_turned_off(start_server: StartServer) -> None:
    server = await start_server(datagram_port="off")
    assert server.datagram is None


# -- delivery --------------------------------------------------------------------------------


async def test_a_datagram_publish_reaches_datagram_and_tls_members_tagged_datagram(
    start_server: StartServer, dtls: Any, open_client: OpenClient
) -> None:
    server = await start_server()
    sensor = await dtls(server.port, name="sensor")
    watcher = await dtls(server.port, name="watcher")
    await watcher.join("sensors.>")
    tls_member = await open_client(server.port, "dashboard")
    await tls_member.join("sensors.*.temp")
    await sensor.publish("sensors.kitchen.temp", {"c": 21.5})
    over_dtls = await watcher.receive(timeout=5)
    over_tls = await asyncio.wait_for(anext(aiter(tls_member)), 5)
    for message in (over_dtls, over_tls):
        assert message.sender == "sensor"
        assert message.room == "sensors.kitchen.temp"
        assert message.body == {"c": 21.5}
        assert message.datagram is True
    assert over_dtls.seq == 1  # counts this association's datagrams


async def test_a_tls_publish_does_not_reach_a_datagram_member(
    start_server: StartServer, dtls: Any, open_client: OpenClient
) -> None:
    server = await start_server()
    watcher = await dtls(server.port, name="watcher")
    await watcher.join("r")
    publisher = await open_client(server.port, "chatty")
    await publisher.publish("r", "over tls", confirm=True, timeout=5)
    sensor = await dtls(server.port, name="sensor")
    await sensor.publish("r", "over dtls")
    message = await watcher.receive(timeout=5)
    assert message.body == "over dtls"


async def test_the_blocking_client_publishes_and_receives(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()

    def exchange() -> Any:
        with (
            datagram.connect_sync(
                "localhost", server.port, ca=str(tls_files.ca_pem), name="a"
            ) as a,
            datagram.connect_sync(
                "localhost", server.port, ca=str(tls_files.ca_pem), name="b"
            ) as b,
        ):
            b.join("r")
            a.publish("r", 42)
            return b.receive(timeout=5)

    message = await asyncio.to_thread(exchange)
    assert (message.sender, message.body, message.datagram) == ("a", 42, True)


# -- the stateless door ----------------------------------------------------------------------


async def test_a_client_hello_without_a_cookie_creates_no_state_and_is_not_amplified(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server(datagram_source_rate=0.0)
    hello = first_flight(tls_files.ca_pem)
    socks = [raw_socket() for _ in range(6)]
    try:
        for sock in socks:
            await asyncio.to_thread(sock.sendto, hello, ("127.0.0.1", udp_port(server)))
        for got in await asyncio.gather(*(asyncio.to_thread(answers, s) for s in socks)):
            assert len(got) == 1  # one HelloVerifyRequest, nothing else
            assert len(got[0]) <= len(hello)
        assert server.datagram is not None
        assert len(server.datagram.table) == 0
        assert server.datagram.counts["cookies_sent"] == 6
    finally:
        for sock in socks:
            sock.close()


async def test_garbage_and_truncated_datagrams_are_ignored_and_the_server_still_serves(
    start_server: StartServer, dtls: Any, tls_files: Any
) -> None:
    server = await start_server()
    sensor = await dtls(server.port, name="sensor")
    watcher = await dtls(server.port, name="watcher")
    await watcher.join("r")
    hello = first_flight(tls_files.ca_pem)
    sock = raw_socket()
    try:
        for junk in (os.urandom(200), b"", b"\x16\xfe\xfd", hello[: len(hello) // 2], hello[:-1]):
            await asyncio.to_thread(sock.sendto, junk, ("127.0.0.1", udp_port(server)))
        assert await asyncio.to_thread(answers, sock) == []
    finally:
        sock.close()
    # Garbage from an associated peer's own address: dropped by DTLS, the association lives.
    assert sensor._transport is not None
    sensor._transport.sendto(os.urandom(100))
    sensor._transport.sendto(b"\x17\xfe\xfd\x00\x01" + os.urandom(20))
    await sensor.publish("r", "still here")
    assert (await watcher.receive(timeout=5)).body == "still here"


async def test_the_source_rate_limit_holds(start_server: StartServer, tls_files: Any) -> None:
    server = await start_server(datagram_source_rate=5.0)
    hello = first_flight(tls_files.ca_pem)
    sock = raw_socket()
    try:
        address = ("127.0.0.1", udp_port(server))
        await asyncio.to_thread(lambda: [sock.sendto(hello, address) for _ in range(50)])
        got = await asyncio.to_thread(answers, sock)
    finally:
        sock.close()
    assert 5 <= len(got) <= 10  # the burst, and what refilled meanwhile
    assert server.datagram is not None
    assert server.datagram.counts["rate_limited"] >= 40


async def test_the_association_cap_holds(start_server: StartServer, dtls: Any) -> None:
    server = await start_server(max_associations=1)
    first = await dtls(server.port, name="first")
    with pytest.raises(TimeoutError):
        await dtls(server.port, name="second", timeout=1.0)
    assert server.datagram is not None
    assert server.datagram.counts["refused_max_associations"] >= 1
    assert await first.ping() < 5


async def test_an_unfinished_handshake_ends_after_the_handshake_timeout(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server(datagram_handshake_timeout=1.0)
    context = client_dtls_context(
        ca=str(tls_files.ca_pem), cert=None, key=None, check=PeerCheck("localhost")
    )
    conn = SSL.Connection(context, None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(MAX_UDP_PAYLOAD)
    sock = raw_socket()
    address = ("127.0.0.1", udp_port(server))
    assert server.datagram is not None
    assert server.datagram._tick is None  # an idle listener does not wake up
    try:
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        await asyncio.to_thread(sock.sendto, conn.bio_read(65536), address)
        conn.bio_write(await asyncio.to_thread(sock.recv, 65536))  # the HelloVerifyRequest
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        await asyncio.to_thread(sock.sendto, conn.bio_read(65536), address)  # with the cookie
        await asyncio.to_thread(sock.recv, 65536)  # the server's flight: it holds state now
        assert server.datagram is not None
        assert len(server.datagram.table) == 1
        await asyncio.sleep(1.5)  # and the client goes silent
        assert len(server.datagram.table) == 0
        assert server.datagram.counts["handshake_timeout"] == 1
        assert server.datagram._tick is None  # nothing left to look at: the ticks stopped
    finally:
        sock.close()


# -- identity --------------------------------------------------------------------------------


async def test_a_client_certificate_names_the_datagram_client(
    start_server: StartServer, dtls: Any, tls_files: Any
) -> None:
    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    cert = {"cert": str(tls_files.alice_cert), "key": str(tls_files.alice_key)}
    alice = await dtls(server.port, name=None, **cert)
    assert alice.name == "alice"
    with pytest.raises(AuthError) as caught:
        await dtls(server.port, name="bob", **cert)
    assert caught.value.code == "unauthorized"
    with pytest.raises(TLSError) as refused:  # no certificate: the handshake is refused
        await dtls(server.port, name="carol", timeout=2.0)
    assert refused.value.check == "client_certificate"


def _rmem_max() -> int:
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(_rmem_max() < 1 << 20, reason="the kernel caps UDP receive buffers low")
async def test_a_burst_of_datagram_publishes_is_not_lost_on_loopback(
    start_server: StartServer, dtls: Any
) -> None:
    server = await start_server()
    sensor = await dtls(server.port, name="sensor")
    watcher = await dtls(server.port, name="watcher")
    await watcher.join("r")
    for n in range(600):  # back to back, without yielding to the loop
        await sensor.publish("r", n)
    got = [(await watcher.receive(timeout=5)).body for _ in range(600)]
    assert got == list(range(600))


class _RecordingProxy(UdpProxy):
    """A lossless relay that keeps what the client sent, to send it again later."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target, Impairment(), host="127.0.0.1")
        self.sent: list[bytes] = []

    def _from_client(self, data: bytes, client: Any) -> None:
        self.sent.append(data)
        super()._from_client(data, client)

    def replay(self, data: bytes) -> None:
        (back,) = self._backs.values()
        assert back.transport is not None
        back.transport.sendto(data)


async def test_a_late_copy_of_the_opening_client_hello_leaves_the_association_alone(
    start_server: StartServer, dtls: Any
) -> None:
    # A lossy link delivers the client's resent ClientHello after the handshake ended
    # (this stranded a client in CI): it must not replace the association.
    server = await start_server()
    async with _RecordingProxy(("127.0.0.1", udp_port(server))) as proxy:
        client = await dtls(proxy.port, name="sensor")
        hellos = [d for d in proxy.sent if (h := parse_client_hello(d)) and h.cookie]
        assert len(hellos) == 1
        proxy.replay(hellos[0])
        assert await client.ping() < 5
        assert server.datagram is not None
        assert server.datagram.counts["hello_retransmissions"] == 1
        assert server.datagram.counts["associations_closed"] == 0


async def test_a_client_restarted_on_the_same_source_port_gets_a_new_association(
    start_server: StartServer, dtls: Any
) -> None:
    server = await start_server()
    first = await dtls(server.port, name="sensor", local_address=("127.0.0.1", 0))
    assert first._transport is not None
    source = first._transport.get_extra_info("sockname")
    first._abort()  # a crash: no bye, no close_notify; the server still holds it
    again = await dtls(server.port, name="sensor", local_address=source, timeout=3.0)
    assert await again.ping() < 5
    assert server.datagram is not None
    assert len(server.datagram.table) == 1


async def test_a_client_whose_association_the_server_forgot_closes_after_the_silence(
    start_server: StartServer, dtls: Any
) -> None:
    server = await start_server(datagram_idle_timeout=0.6)
    watcher = await dtls(server.port, name="watcher")
    assert server.datagram is not None
    for association in server.datagram.table.values():  # as a restarted server would
        server.datagram.table.remove(association.key)
    with pytest.raises(ClosedError, match="no answer from the server"):
        async for _ in watcher:  # iteration too ends with the error, not quietly
            pass
