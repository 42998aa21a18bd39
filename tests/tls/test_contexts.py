"""Real TLS on 127.0.0.1: contexts, verification failures in plain words, peer identity.

Two throw-away servers: an asyncio one (what securemsg runs) and a blocking one in a thread.
The blocking one exists because an asyncio server on Python 3.11 drops the TLS alert when
a handshake fails (CPython gh-98078); the blocking one sends it, so the client-side checks
that depend on an alert ("certificate required", "unknown ca", "protocol version") are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.errors import TLSConfigError, TLSError
from securemsg.tls.contexts import (
    ALPN_PROTOCOL,
    client_context,
    describe_server_handshake_error,
    peer_identity,
    server_context,
    translate_client_error,
)

if TYPE_CHECKING:
    from tests.conftest import TLSFiles

WAIT = 5.0  # generous deadline for one local exchange; a passing test takes milliseconds


@dataclass
class Seen:
    """What a throw-away server saw of its clients."""

    port: int = 0
    identities: list[str | None] = field(default_factory=list)
    alpn: list[str | None] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


@dataclass(frozen=True)
class Exchanged:
    reply: bytes
    version: str | None
    alpn: str | None
    cipher: str
    server_identity: str | None


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    decoder = FrameDecoder()
    while True:
        data = await reader.read(4096)
        if not data:
            raise EOFError("the peer closed the connection before a whole frame")
        if frames := decoder.feed(data):
            return frames[0]


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def asyncio_server(context: ssl.SSLContext) -> AsyncIterator[Seen]:
    """Answers one frame with ``pong:`` + that frame, recording who the client was."""
    seen = Seen()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            seen.identities.append(peer_identity(ssl_object))
            seen.alpn.append(ssl_object.selected_alpn_protocol())
            frame = await read_frame(reader)
            writer.write(encode_frame(b"pong:" + frame))
            await writer.drain()
        except (OSError, EOFError) as exc:
            seen.errors.append(exc)
        finally:
            await close(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    seen.port = server.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), WAIT)


@contextlib.asynccontextmanager
async def blocking_server(context: ssl.SSLContext) -> AsyncIterator[Seen]:
    """Serves one connection from a thread with a blocking SSLSocket, which sends alerts."""
    seen = Seen()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    seen.port = listener.getsockname()[1]

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError as exc:
            seen.errors.append(exc)
            return
        connection.settimeout(WAIT)
        with context.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        ) as tls:
            try:
                tls.do_handshake()
            except OSError as exc:
                seen.errors.append(exc)
                # Drain before closing: closing with unread bytes sends a RST, which can
                # destroy the alert before the client reads it.
                with contextlib.suppress(OSError):
                    tls.shutdown(socket.SHUT_WR)
                    while tls.recv(4096):
                        pass
                return
            seen.identities.append(peer_identity(tls))
            tls.sendall(encode_frame(b"pong:ping"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        await asyncio.to_thread(thread.join, WAIT)
        listener.close()


async def exchange(port: int, context: ssl.SSLContext, *, host: str = "localhost") -> Exchanged:
    """Connect, send one frame, read one frame back."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=host
        )
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            writer.write(encode_frame(b"ping"))
            await writer.drain()
            return Exchanged(
                reply=await read_frame(reader),
                version=ssl_object.version(),
                alpn=ssl_object.selected_alpn_protocol(),
                cipher=ssl_object.cipher()[0],
                server_identity=peer_identity(ssl_object),
            )
        finally:
            await close(writer)


async def failed_exchange(
    port: int, context: ssl.SSLContext, *, host: str = "localhost"
) -> Exception:
    with pytest.raises((OSError, EOFError)) as caught:
        await exchange(port, context, host=host)
    return caught.value


def tls11_client(ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


# -- success ----------------------------------------------------------------------------------


async def test_round_trip_negotiates_tls13_and_alpn(
    server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    async with asyncio_server(server_ssl_context) as seen:
        result = await exchange(seen.port, client_ssl_context)
    assert result.reply == b"pong:ping"
    assert result.version == "TLSv1.3"
    assert result.alpn == ALPN_PROTOCOL
    assert seen.alpn == [ALPN_PROTOCOL]
    assert seen.identities == [None]  # client certificates are optional here
    assert result.server_identity == "localhost"  # no common name: the first DNS name


async def test_mutual_tls_server_reads_client_common_name(tls_files: TLSFiles) -> None:
    server = server_context(
        cert=tls_files.server_cert,
        key=tls_files.server_key,
        ca=tls_files.ca_pem,
        require_client_cert=True,
    )
    client = client_context(ca=tls_files.ca_pem, cert=tls_files.alice_cert, key=tls_files.alice_key)
    async with asyncio_server(server) as seen:
        result = await exchange(seen.port, client)
    assert result.reply == b"pong:ping"
    assert seen.identities == ["alice"]


async def test_certificate_and_key_may_share_one_file(tls_files: TLSFiles, tmp_path: Path) -> None:
    combined = tmp_path / "server-with-key.pem"
    combined.write_bytes(tls_files.server_cert.read_bytes() + tls_files.server_key.read_bytes())
    async with asyncio_server(server_context(cert=combined, tls13_only=True)) as seen:
        result = await exchange(seen.port, client_context(ca=tls_files.ca_pem))
    assert result.reply == b"pong:ping"


async def test_tls12_client_gets_an_ecdhe_aead_cipher(
    server_ssl_context: ssl.SSLContext, tls_files: TLSFiles
) -> None:
    client = client_context(ca=tls_files.ca_pem)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with asyncio_server(server_ssl_context) as seen:
        result = await exchange(seen.port, client)
    assert result.version == "TLSv1.2"
    assert result.alpn == ALPN_PROTOCOL
    assert result.cipher.startswith("ECDHE-")
    assert "GCM" in result.cipher or "CHACHA20" in result.cipher


# -- the client's own verification --------------------------------------------------------------


async def test_wrong_ca_is_unknown_authority(
    server_ssl_context: ssl.SSLContext, tls_files: TLSFiles
) -> None:
    async with asyncio_server(server_ssl_context) as seen:
        exc = await failed_exchange(seen.port, client_context(ca=tls_files.other_ca_pem))
    error = translate_client_error(
        exc, host="localhost", ca=str(tls_files.other_ca_pem), mutual=False
    )
    assert isinstance(error, TLSError)
    assert error.check == "unknown_authority"
    assert "--ca" in str(error)
    assert str(tls_files.other_ca_pem) in str(error)


async def test_wrong_host_name_is_hostname_mismatch(
    server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    async with asyncio_server(server_ssl_context) as seen:
        exc = await failed_exchange(seen.port, client_ssl_context, host="wronghost")
    error = translate_client_error(exc, host="wronghost", ca=None, mutual=False)
    assert error.check == "hostname_mismatch"
    assert "wronghost" in str(error)


async def test_expired_server_certificate_is_expired(tls_files: TLSFiles, tmp_path: Path) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    leaf = tls_files.ca.issue_cert("localhost", not_after=past)
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "expired.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "expired.key"))
    server = server_context(cert=tmp_path / "expired.pem", key=tmp_path / "expired.key")
    async with asyncio_server(server) as seen:
        exc = await failed_exchange(seen.port, client_context(ca=tls_files.ca_pem))
    assert translate_client_error(exc, host="localhost", ca=None, mutual=False).check == "expired"


async def test_plaintext_port_is_a_protocol_error(client_ssl_context: ssl.SSLContext) -> None:
    async def answer_in_plaintext(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello, this is not TLS\n")
        await close(writer)

    server = await asyncio.start_server(answer_in_plaintext, "127.0.0.1", 0)
    try:
        exc = await failed_exchange(server.sockets[0].getsockname()[1], client_ssl_context)
    finally:
        server.close()
        await server.wait_closed()
    error = translate_client_error(exc, host="localhost", ca=None, mutual=False)
    assert error.check == "protocol"
    assert "plaintext" in str(error)


# -- the server refuses the client ----------------------------------------------------------------


def mutual_server(tls_files: TLSFiles) -> ssl.SSLContext:
    return server_context(
        cert=tls_files.server_cert,
        key=tls_files.server_key,
        ca=tls_files.ca_pem,
        require_client_cert=True,
    )


async def test_asyncio_server_refuses_client_without_certificate(tls_files: TLSFiles) -> None:
    async with asyncio_server(mutual_server(tls_files)) as seen:
        exc = await failed_exchange(seen.port, client_context(ca=tls_files.ca_pem))
    assert seen.identities == []  # the handler never ran
    error = translate_client_error(exc, host="localhost", ca=None, mutual=False)
    assert "--cert/--key" in str(error)  # no alert arrives (gh-98078), so only a hint


async def test_asyncio_server_refusing_our_certificate_is_client_certificate(
    tls_files: TLSFiles,
) -> None:
    client = client_context(
        ca=tls_files.ca_pem, cert=tls_files.intruder_cert, key=tls_files.intruder_key
    )
    async with asyncio_server(mutual_server(tls_files)) as seen:
        exc = await failed_exchange(seen.port, client)
    assert seen.identities == []
    error = translate_client_error(exc, host="localhost", ca=None, mutual=True)
    assert error.check == "client_certificate"


async def test_certificate_required_alert_is_client_certificate(tls_files: TLSFiles) -> None:
    async with blocking_server(mutual_server(tls_files)) as seen:
        exc = await failed_exchange(seen.port, client_context(ca=tls_files.ca_pem))
    error = translate_client_error(exc, host="localhost", ca=None, mutual=False)
    assert error.check == "client_certificate"
    assert "--cert and --key" in str(error)
    [server_error] = seen.errors
    assert describe_server_handshake_error(server_error) == "no_client_certificate"


@pytest.mark.parametrize("tls12", [False, True])
async def test_certificate_from_another_ca_is_refused(tls_files: TLSFiles, tls12: bool) -> None:
    client = client_context(
        ca=tls_files.ca_pem, cert=tls_files.intruder_cert, key=tls_files.intruder_key
    )
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with blocking_server(mutual_server(tls_files)) as seen:
        exc = await failed_exchange(seen.port, client)
    error = translate_client_error(exc, host="localhost", ca=None, mutual=True)
    assert error.check == "client_certificate"
    assert "--cert/--key" in str(error)
    [server_error] = seen.errors
    assert describe_server_handshake_error(server_error) == "unknown_ca"


async def test_tls11_client_is_refused(
    server_ssl_context: ssl.SSLContext, tls_files: TLSFiles
) -> None:
    async with blocking_server(server_ssl_context) as seen:
        exc = await failed_exchange(seen.port, tls11_client(tls_files.ca_pem))
    assert translate_client_error(exc, host="localhost", ca=None, mutual=False).check == "protocol"
    [server_error] = seen.errors
    assert describe_server_handshake_error(server_error) == "protocol_version"


async def test_tls13_only_server_refuses_tls12(tls_files: TLSFiles) -> None:
    server = server_context(cert=tls_files.server_cert, key=tls_files.server_key, tls13_only=True)
    client = client_context(ca=tls_files.ca_pem)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with blocking_server(server) as seen:
        exc = await failed_exchange(seen.port, client)
    assert translate_client_error(exc, host="localhost", ca=None, mutual=False).check == "protocol"
    assert describe_server_handshake_error(seen.errors[0]) == "protocol_version"


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [(b"hello\n", "plaintext"), (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "http_request")],
)
async def test_server_names_what_a_non_tls_client_sent(
    server_ssl_context: ssl.SSLContext, first_bytes: bytes, reason: str
) -> None:
    async with blocking_server(server_ssl_context) as seen:
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection("127.0.0.1", seen.port)
            writer.write(first_bytes)
            with contextlib.suppress(OSError):
                await reader.read()
            await close(writer)
    assert describe_server_handshake_error(seen.errors[0]) == reason


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "connection_reset"),
        (asyncio.IncompleteReadError(b"", 5), "eof"),
        (BrokenPipeError(), "broken_pipe"),
    ],
)
def test_server_reasons_for_transport_failures(exc: BaseException, reason: str) -> None:
    assert describe_server_handshake_error(exc) == reason


def test_timeout_and_reset_translate_to_other_with_a_hint() -> None:
    timeout = translate_client_error(TimeoutError(), host="h", ca=None, mutual=False)
    assert timeout.check == "other"
    assert "timed out" in str(timeout)
    reset = translate_client_error(ConnectionResetError(), host="h", ca=None, mutual=False)
    assert reset.check == "other"
    assert "--cert/--key" in str(reset)
    # Having sent a certificate, a bare close most likely means it was rejected (gh-98078).
    rejected = translate_client_error(EOFError(), host="h", ca=None, mutual=True)
    assert rejected.check == "client_certificate"


# -- configuration errors ------------------------------------------------------------------------


def test_missing_certificate_file_names_file_and_option(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError) as caught:
        server_context(cert=missing, key=tls_files.server_key)
    assert str(caught.value) == f"certificate file {missing} (--cert) does not exist"


def test_missing_key_and_ca_files_name_their_options(tls_files: TLSFiles, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"key file .*nope\.key \(--key\) does not exist"):
        server_context(cert=tls_files.server_cert, key=tmp_path / "nope.key")
    with pytest.raises(TLSConfigError, match=r"CA file .*nope\.pem \(--ca\) does not exist"):
        client_context(ca=tmp_path / "nope.pem")


def test_directory_instead_of_file_says_so(tls_files: TLSFiles, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"\(--ca\) is a directory"):
        server_context(cert=tls_files.server_cert, key=tls_files.server_key, ca=tmp_path)


def test_key_that_does_not_match_the_certificate_says_so(tls_files: TLSFiles) -> None:
    with pytest.raises(TLSConfigError, match="does not match certificate file") as caught:
        server_context(cert=tls_files.server_cert, key=tls_files.alice_key)
    assert str(tls_files.alice_key) in str(caught.value)
    assert isinstance(caught.value.__cause__, ssl.SSLError)


def test_pem_without_certificate_says_so(tls_files: TLSFiles) -> None:
    with pytest.raises(TLSConfigError, match=r"\(--cert\) holds no PEM certificate"):
        server_context(cert=tls_files.server_key, key=tls_files.server_key)
    with pytest.raises(TLSConfigError, match=r"\(--ca\) holds no PEM certificate"):
        client_context(ca=tls_files.alice_key)


def test_certificate_without_key_asks_for_key(tls_files: TLSFiles) -> None:
    with pytest.raises(TLSConfigError, match=r"holds no private key; pass it with --key"):
        server_context(cert=tls_files.server_cert)


def test_encrypted_key_is_refused_without_prompting(tls_files: TLSFiles, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls_files.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="is encrypted"):
        server_context(cert=tls_files.server_cert, key=encrypted)


def test_requiring_client_certificates_needs_a_ca(tls_files: TLSFiles) -> None:
    with pytest.raises(TLSConfigError, match="--ca"):
        server_context(
            cert=tls_files.server_cert, key=tls_files.server_key, require_client_cert=True
        )


def test_contexts_are_hardened(tls_files: TLSFiles) -> None:
    server = server_context(
        cert=tls_files.server_cert, key=tls_files.server_key, ca=tls_files.ca_pem
    )
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert server.num_tickets == 0
    required = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    assert server.options & required == required
    tls12_suites = [c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12_suites
    assert all(name.startswith("ECDHE-") for name in tls12_suites)
    client = client_context(tls13_only=True)  # system store
    assert client.check_hostname
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3


def test_the_server_sends_no_session_tickets_unless_told_to(tls_files: TLSFiles) -> None:
    quiet = server_context(cert=tls_files.server_cert, key=tls_files.server_key)
    assert quiet.num_tickets == 0
    assert quiet.options & ssl.OP_NO_TICKET
    talking = server_context(
        cert=tls_files.server_cert, key=tls_files.server_key, session_tickets=2
    )
    assert talking.num_tickets == 2
    # Stateless tickets: with OP_NO_TICKET OpenSSL would cache every TLS 1.3 ticket.
    assert not talking.options & ssl.OP_NO_TICKET
