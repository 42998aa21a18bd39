"""Certificate reload (SIGHUP) over real TLS: open connections live on, new ones see the new
certificate, a bad new file keeps the old one, and the expiry warning."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from structlog.testing import capture_logs

from securemsg import datagram
from securemsg.config import ServerConfig
from securemsg.core.messages import Join, ServerAck
from securemsg.tls.contexts import client_context

pytestmark = pytest.mark.asyncio

NOW = dt.datetime.now(dt.UTC)


def write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    leaf.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)


@pytest.fixture
def server_files(tmp_path: Path, tls_files: Any) -> tuple[Path, Path]:
    """A copy of the server's certificate and key that a test may overwrite."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(tls_files.server_cert, cert)
    shutil.copy(tls_files.server_key, key)
    return cert, key


def peer_common_name(client: Any) -> str:
    subject = client.writer.get_extra_info("peercert")["subject"]
    return str(dict(item for rdn in subject for item in rdn).get("commonName", ""))


async def test_reload_keeps_open_connections_and_new_ones_get_the_new_certificate(
    start_server: Any, raw: Any, tls_files: Any, server_files: tuple[Path, Path]
) -> None:
    cert, key = server_files
    server = await start_server(cert=str(cert), key=str(key))
    alice = await raw(server.port, "alice")
    leaf = tls_files.ca.issue_cert("localhost", "127.0.0.1", common_name="renewed")
    write_leaf(leaf, cert, key)

    with capture_logs() as logs:
        assert server.reload_tls() is True
    assert [e["event"] for e in logs] == ["certificate_reloaded"]

    alice.send(Join(room="r", id="j1"))  # the open connection still works
    assert (await alice.recv_type(ServerAck)).ids == ["j1"]
    bob = await raw(server.port, "bob")
    assert peer_common_name(bob) == "renewed"
    assert server.cert_reloads == {"ok": 1}


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        ("garbage_key", "holds no PEM private key"),
        ("other_key", "does not match"),
        ("missing", "does not exist"),
        ("expired", "expired on"),
    ],
)
async def test_a_bad_new_file_keeps_the_old_certificate_and_logs_one_error(
    start_server: Any,
    raw: Any,
    tls_files: Any,
    server_files: tuple[Path, Path],
    breakage: str,
    complaint: str,
) -> None:
    cert, key = server_files
    server = await start_server(cert=str(cert), key=str(key))
    old_context = server.ssl_context
    if breakage == "garbage_key":
        key.write_text("not a key\n")
    elif breakage == "other_key":
        shutil.copy(tls_files.alice_key, key)
    elif breakage == "missing":
        cert.unlink()
    else:
        old = NOW - dt.timedelta(days=10)
        expired = tls_files.ca.issue_cert(
            "localhost", "127.0.0.1", not_before=old, not_after=old + dt.timedelta(days=1)
        )
        write_leaf(expired, cert, key)

    with capture_logs() as logs:
        assert server.reload_tls() is False
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["certificate_reload_failed"]
    assert complaint in errors[0]["error"]
    assert server.ssl_context is old_context
    assert server.cert_reloads == {"failed": 1}
    client = await raw(server.port, "alice")  # new handshakes still work, with the old files
    assert peer_common_name(client) != "renewed"


async def test_reload_applies_a_new_client_certificate_requirement(
    start_server: Any, raw: Any, tls_files: Any
) -> None:
    server = await start_server()
    required = ServerConfig(
        cert=str(tls_files.server_cert),
        key=str(tls_files.server_key),
        ca=str(tls_files.ca_pem),
        require_client_cert=True,
    )
    assert server.reload_tls(lambda: required) is True
    mutual = client_context(ca=tls_files.ca_pem, cert=tls_files.alice_cert, key=tls_files.alice_key)
    alice = await raw(server.port, None, ctx=mutual)
    assert (await alice.hello(None)).name == "alice"  # the name comes from the certificate
    anonymous = await raw(server.port)  # TLS 1.3: the refusal comes after the handshake
    assert await anonymous.closed()


async def test_the_certificate_expiring_warning_at_start_says_the_days_left(
    start_server: Any, tls_files: Any, server_files: tuple[Path, Path]
) -> None:
    cert, key = server_files
    soon = tls_files.ca.issue_cert(
        "localhost", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=5)
    )
    write_leaf(soon, cert, key)
    with capture_logs() as logs:
        await start_server(cert=str(cert), key=str(key))
        await start_server(cert=str(cert), key=str(key), cert_expiry_warning_days=3)
        await start_server()  # the fixture's certificate is valid for years: no warning
    warnings = [e for e in logs if e["event"] == "certificate_expiring"]
    assert len(warnings) == 1
    assert 4 < warnings[0]["days_left"] <= 5


async def test_sighup_reloads_instead_of_killing_the_server(
    tls_files: Any, server_files: tuple[Path, Path], unit: float
) -> None:
    cert, key = server_files
    env = {**os.environ, "SECUREMSG_NO_UVLOOP": "1"}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "securemsg", "server", "--port", "0", "--log-format", "json"),
        *("--cert", str(cert), "--key", str(key)),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            events = [await _next_event(process.stderr)]
            while events[-1]["event"] != "server_listening":
                events.append(await _next_event(process.stderr))
            process.send_signal(signal.SIGHUP)
            while events[-1]["event"] != "certificate_reloaded":
                events.append(await _next_event(process.stderr))
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _next_event(stream: asyncio.StreamReader) -> dict[str, Any]:
    line = await stream.readline()
    assert line, "the server exited"
    return dict(json.loads(line))


async def test_the_client_reads_its_renewed_certificate_on_reconnect(
    start_server: Any, tls_files: Any, tmp_path: Path, unit: float
) -> None:
    import securemsg

    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    cert, key = tmp_path / "alice.pem", tmp_path / "alice.key"
    shutil.copy(tls_files.alice_cert, cert)
    shutil.copy(tls_files.alice_key, key)
    client = await securemsg.connect(
        "localhost",
        server.port,
        ca=str(tls_files.ca_pem),
        cert=str(cert),
        key=str(key),
        reconnect_base=0.01,
        reconnect_cap=0.05,
    )
    try:
        renewed = tls_files.ca.issue_cert(common_name="alice")
        write_leaf(renewed, cert, key)
        (old,) = server.connections
        assert old.transport is not None
        old.transport.abort()
        async with asyncio.timeout(5):
            while not server.connections or old in server.connections:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        (new,) = server.connections
        der = new.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der == _der(renewed)
    finally:
        await client.close()


def _der(leaf: trustme.LeafCert) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


async def test_changed_files_are_reloaded_once_they_have_settled(
    start_server: Any, raw: Any, tls_files: Any, server_files: tuple[Path, Path]
) -> None:
    cert, key = server_files
    server = await start_server(cert=str(cert), key=str(key))
    keeper = server.certificates
    assert keeper.look() is False  # nothing changed
    write_leaf(tls_files.ca.issue_cert("localhost", "127.0.0.1", common_name="renewed"), cert, key)
    with capture_logs() as logs:
        assert keeper.look() is False  # changed since the last look: wait for it to settle
        assert keeper.look() is True
        assert keeper.look() is False  # loaded: nothing more to do
    assert [e["event"] for e in logs] == ["certificate_reloaded"]
    assert peer_common_name(await raw(server.port, "bob")) == "renewed"


async def test_a_bad_changed_file_is_reported_once_and_the_old_one_kept(
    start_server: Any, raw: Any, server_files: tuple[Path, Path]
) -> None:
    cert, key = server_files
    server = await start_server(cert=str(cert), key=str(key))
    keeper = server.certificates
    key.write_text("not a key\n")
    with capture_logs() as logs:
        for _ in range(4):
            keeper.look()
    assert [e["event"] for e in logs] == ["certificate_reload_failed"]
    await raw(server.port, "bob")  # new handshakes still work, with the old files


async def test_a_reload_reaches_new_datagram_associations_and_keeps_open_ones(
    start_server: Any, tls_files: Any, server_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = server_files
    server = await start_server(cert=str(cert), key=str(key))
    ca = str(tls_files.ca_pem)
    before = await datagram.connect("localhost", server.port, ca=ca, name="before")
    try:
        renewed = trustme.CA()  # a new CA too: only the new certificate passes it
        renewed.cert_pem.write_to_path(str(tmp_path / "renewed-ca.pem"))
        write_leaf(renewed.issue_cert("localhost", "127.0.0.1"), cert, key)
        assert server.reload_tls() is True
        after = await datagram.connect(
            "localhost", server.port, ca=str(tmp_path / "renewed-ca.pem"), name="after"
        )
        await after.close()
        assert await before.ping() < 5  # the open association keeps its keys
    finally:
        await before.close()
