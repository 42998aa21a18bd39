"""``securemsg doctor`` against real servers: good, wrong CA, wrong host name, a client
certificate required, a closed port, a plaintext port; and the local checks."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from securemsg.cli import doctor
from securemsg.config import ClientConfig

ALL_STEPS = [
    "files",
    "resolve",
    "tcp",
    "tls",
    "alpn",
    "certificate",
    "verify",
    "client_certificate",
    "welcome",
    "round_trip",
    "clock",
]


async def diagnose(port: int, **options: Any) -> list[doctor.Step]:
    config = ClientConfig(port=port, connect_timeout=5.0, **options)
    return await asyncio.to_thread(doctor.diagnose, config)


def last(steps: list[doctor.Step]) -> doctor.Step:
    assert all(step.ok for step in steps[:-1])
    return steps[-1]


async def test_a_good_server_passes_every_step(start_server: Any, tls_files: Any) -> None:
    server = await start_server()
    steps = await diagnose(server.port, host="localhost", ca=str(tls_files.ca_pem))
    assert [step.step for step in steps] == ALL_STEPS
    assert all(step.ok for step in steps), [s.detail for s in steps if not s.ok]
    assert steps[3].facts["version"] in ("TLSv1.2", "TLSv1.3")
    assert "localhost" in steps[5].facts["names"]
    assert steps[8].facts["max_frame"] == server.config.max_frame
    assert not server.broker.by_token  # the doctor said bye: no session left behind


async def test_a_wrong_ca_fails_verification_with_the_fix(
    start_server: Any, tls_files: Any
) -> None:
    server = await start_server()
    steps = await diagnose(server.port, host="localhost", ca=str(tls_files.other_ca_pem))
    failed = last(steps)
    assert (failed.step, failed.ok) == ("verify", False)
    assert "not signed by the CA in" in failed.detail
    assert failed.fix is not None and "--ca" in failed.fix
    assert steps[-2].step == "certificate"  # described before the verdict


async def test_a_wrong_host_name_fails_verification(
    start_server: Any, tls_files: Any, tmp_path: Path
) -> None:
    leaf = tls_files.ca.issue_cert("elsewhere.test")
    cert, key = tmp_path / "other.pem", tmp_path / "other.key"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    server = await start_server(cert=str(cert), key=str(key))
    steps = await diagnose(server.port, host="localhost", ca=str(tls_files.ca_pem))
    failed = last(steps)
    assert (failed.step, failed.ok) == ("verify", False)
    assert "not valid for the name 'localhost'" in failed.detail
    assert steps[-2].facts["names"] == ["elsewhere.test"]


async def test_a_server_that_requires_a_client_certificate(
    start_server: Any, tls_files: Any
) -> None:
    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    ca = str(tls_files.ca_pem)
    failed = last(await diagnose(server.port, host="localhost", ca=ca, name="x"))
    assert (failed.step, failed.ok) == ("client_certificate", False)
    assert "requires a client certificate" in failed.detail
    assert failed.fix is not None and "--cert" in failed.fix

    steps = await diagnose(
        server.port,
        host="localhost",
        ca=ca,
        cert=str(tls_files.alice_cert),
        key=str(tls_files.alice_key),
    )
    assert all(step.ok for step in steps)
    assert steps[7].detail == "accepted"
    assert steps[8].facts["name"] == "alice"


async def test_a_closed_port_fails_at_tcp() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    failed = last(await diagnose(port, host="127.0.0.1"))
    assert (failed.step, failed.ok) == ("tcp", False)
    assert "connection refused" in failed.detail


async def test_a_plaintext_port_fails_at_tls() -> None:
    async def answer_in_plain_text(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1024)
        writer.write(b"-ERR unknown command\r\n")
        await writer.drain()
        writer.close()

    plain = await asyncio.start_server(answer_in_plain_text, "127.0.0.1", 0)
    async with plain:
        port = plain.sockets[0].getsockname()[1]
        failed = last(await diagnose(port, host="127.0.0.1"))
    assert (failed.step, failed.ok) == ("tls", False)
    assert "plaintext" in failed.detail


@pytest.mark.parametrize(
    ("behaviour", "complaint"),
    [("close", "closed the connection instead of answering in TLS"), ("wait", "within 0.3 s")],
)
async def test_a_port_that_closes_or_stays_silent_fails_at_tls(
    behaviour: str, complaint: str
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "wait":
            await reader.read()  # until the client gives up
        writer.close()

    other = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with other:
        port = other.sockets[0].getsockname()[1]
        config = ClientConfig(host="127.0.0.1", port=port, connect_timeout=0.3)
        failed = last(await asyncio.to_thread(doctor.diagnose, config))
    assert (failed.step, failed.ok) == ("tls", False)
    assert complaint in failed.detail


async def securemsg(*argv: str) -> tuple[int, str, str]:
    """Run the command in a child process (the command configures logging for its process)."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "securemsg", *argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_command_prints_json_and_exits_1_with_one_sentence(
    start_server: Any, tls_files: Any
) -> None:
    server = await start_server()
    where = f"localhost:{server.port}"
    status, out, _ = await securemsg("doctor", where, "--ca", str(tls_files.ca_pem), "--json")
    assert status == 0
    report = json.loads(out)
    assert report["ok"] is True
    assert [step["step"] for step in report["steps"]] == ALL_STEPS

    status, out, err = await securemsg("doctor", where, "--ca", str(tls_files.other_ca_pem))
    assert status == 1
    assert "FAIL  verify" in out
    (line,) = err.strip().splitlines()
    assert line.startswith("securemsg: doctor: the certificate of localhost is not signed")


async def test_without_an_address_the_local_files_are_checked(tls_files: Any) -> None:
    good = ["--ca", str(tls_files.ca_pem), "--cert", str(tls_files.alice_cert)]
    status, out, _ = await securemsg("doctor", *good, "--key", str(tls_files.alice_key))
    assert status == 0
    assert "securemsg doctor: local configuration" in out

    status, _, err = await securemsg("doctor", *good, "--key", str(tls_files.bob_key))
    assert status == 1
    assert "does not match" in err

    status, _, err = await securemsg("doctor", "--ca", str(tls_files.ca_pem))
    assert status == 1  # no name and no certificate: the server could not name us
    assert "no name to register as" in err
