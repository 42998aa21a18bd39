"""The development PKI: files, modes, reruns, and a real TLS exchange over what it wrote."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.errors import TLSConfigError
from securemsg.tls.contexts import ALPN_PROTOCOL, client_context, peer_identity, server_context
from securemsg.tls.devcerts import DEFAULT_HOSTS, dev_pki_banner, ensure_dev_pki, make_dev_pki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    decoder = FrameDecoder()
    while data := await reader.read(4096):
        if frames := decoder.feed(data):
            return frames[0]
    raise EOFError("the peer closed the connection before a whole frame")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_writes_ca_server_and_client_files_with_private_keys_0600(tmp_path: Path) -> None:
    directory = tmp_path / "made" / "here"
    pki = make_dev_pki(directory, clients=["alice"])
    names = {path.name for path in directory.iterdir()}
    assert names == {"ca.pem", "ca.key", "server.pem", "server.key", "alice.pem", "alice.key"}
    assert set(pki.created) == {directory / name for name in names}
    assert pki.clients == {"alice": (directory / "alice.pem", directory / "alice.key")}
    for key in (pki.ca_key, pki.server_key, pki.clients["alice"][1]):
        assert mode(key) == 0o600
    assert mode(pki.server_cert) == 0o644


def test_server_certificate_has_hosts_in_a_non_critical_san(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path)
    certificate = load(pki.server_cert)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certificate.issuer == load(pki.ca).subject


def test_rerun_keeps_the_ca_and_adds_only_the_new_client(tmp_path: Path) -> None:
    first = make_dev_pki(tmp_path, clients=["alice"])
    before = {path: path.read_bytes() for path in first.created}
    second = make_dev_pki(tmp_path, clients=["alice", "bob"])
    assert second.created == [tmp_path / "bob.pem", tmp_path / "bob.key"]
    assert {path: path.read_bytes() for path in first.created} == before
    assert load(second.clients["bob"][0]).issuer == load(second.ca).subject


def test_force_replaces_the_ca(tmp_path: Path) -> None:
    first = make_dev_pki(tmp_path)
    old_ca = first.ca.read_bytes()
    second = make_dev_pki(tmp_path, force=True)
    assert second.ca.read_bytes() != old_ca
    assert set(second.created) == {second.ca, second.ca_key, second.server_cert, second.server_key}
    assert mode(second.ca_key) == 0o600


def test_corrupt_ca_names_the_file(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path)
    pki.ca.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=f"CA certificate {pki.ca} is not a PEM certificate"):
        make_dev_pki(tmp_path)


def test_missing_ca_key_names_the_file(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path)
    pki.ca_key.unlink()
    with pytest.raises(TLSConfigError, match=f"CA key {pki.ca_key} is missing"):
        make_dev_pki(tmp_path)


def test_unwritable_directory_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TLSConfigError, match=f"cannot create certificate directory {blocker}"):
        make_dev_pki(blocker / "pki")


@pytest.mark.parametrize("name", ["ca", "server", "../evil", "", ".hidden", "a b"])
def test_client_names_that_cannot_be_file_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(TLSConfigError, match="client name"):
        make_dev_pki(tmp_path, clients=[name])
    assert not any(tmp_path.iterdir())


def test_banner_says_development_only_and_what_to_pass(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    banner = dev_pki_banner(pki)
    assert "development only" in banner
    assert f"--cert {pki.server_cert} --key {pki.server_key}" in banner
    assert f"--ca {pki.ca}" in banner
    alice_cert, alice_key = pki.clients["alice"]
    assert f"--cert {alice_cert} --key {alice_key}" in banner
    assert ensure_dev_pki(tmp_path).created == []


async def test_done_means_a_tls_exchange_over_the_written_files(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path, clients=["alice"])
    alice_cert, alice_key = pki.clients["alice"]
    server_ssl = server_context(
        cert=pki.server_cert, key=pki.server_key, ca=pki.ca, require_client_cert=True
    )
    client_ssl = client_context(ca=pki.ca, cert=alice_cert, key=alice_key)
    identities: list[str | None] = []

    async def echo_one_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        identities.append(peer_identity(writer.get_extra_info("ssl_object")))
        try:
            writer.write(encode_frame(await read_frame(reader)))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(echo_one_frame, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ssl, server_hostname=DEFAULT_HOSTS[1]
            )
            try:
                assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == ALPN_PROTOCOL
                writer.write(encode_frame(b"hello"))
                reply = await read_frame(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert reply == b"hello"
    assert identities == ["alice"]
