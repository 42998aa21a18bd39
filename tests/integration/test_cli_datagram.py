"""``send --datagram`` and ``listen --datagram`` as real processes against a server on
127.0.0.1 (DTLS over UDP)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from tests.integration.conftest import StartServer
from tests.integration.test_cli_client import ROOT, WAIT, _env

pytestmark = pytest.mark.timeout(60)

PIPE = asyncio.subprocess.PIPE


async def securemsg(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "securemsg",
        *args,
        cwd=ROOT,
        env=_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=PIPE,
        stderr=PIPE,
    )


async def test_listen_datagram_prints_a_datagram_sent_by_send_datagram_as_such(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    assert server.datagram is not None
    where = f"localhost:{server.port}"
    ca = str(tls_files.ca_pem)
    listener = await securemsg(
        "listen", where, "--datagram", "--json", "--count", "1", "--room", "r.*", "--ca", ca
    )
    try:
        for _ in range(int(WAIT / 0.02)):  # until it joined: ready
            if server.datagram.rooms.match("r.x"):
                break
            await asyncio.sleep(0.02)
        sender = await securemsg(
            "send", "--datagram", "--room", "r.x", where, '{"t":1}', "--ca", ca
        )
        _, err = await asyncio.wait_for(sender.communicate(), WAIT)
        assert sender.returncode == 0, err
        out, err = await asyncio.wait_for(listener.communicate(), WAIT)
    finally:
        if listener.returncode is None:
            listener.kill()
            await listener.wait()
    assert listener.returncode == 0, err
    record = json.loads(out.decode().strip())
    assert record["datagram"] is True
    assert (record["room"], record["body"], record["seq"]) == ("r.x", {"t": 1}, 1)


async def test_send_datagram_refuses_a_direct_message(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    sender = await securemsg(
        "send",
        "--datagram",
        "--to",
        "bob",
        f"localhost:{server.port}",
        "hi",
        "--ca",
        str(tls_files.ca_pem),
    )
    _, err = await asyncio.wait_for(sender.communicate(), WAIT)
    assert sender.returncode == 1
    assert b"--room only" in err
