"""A server with ``--store``: a restart, clean or ``kill -9``, loses nothing that was
acknowledged (issue 13). Real servers in subprocesses on 127.0.0.1, real clients."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from securemsg.client.client import Client
from securemsg.client.types import Reconnected
from tests.faults import ServerProcess
from tests.integration.conftest import OpenClient


def server_args(tls_files: Any, store: Path) -> list[str]:
    return [
        "--cert", str(tls_files.server_cert), "--key", str(tls_files.server_key),
        "--store", str(store), "--session-ttl", "30",
    ]  # fmt: skip


async def collect(client: Client, into: list[Any], *, until: int) -> None:
    while len(into) < until:
        into.append((await client.receive(timeout=60)).body)


async def test_acknowledged_messages_survive_kill_9_and_clients_resume(
    tls_files: Any, tmp_path: Path, open_client: OpenClient, unit: float
) -> None:
    server = ServerProcess(server_args(tls_files, tmp_path / "s.db"))
    port = await asyncio.to_thread(server.start)
    try:
        sub = await open_client(port, "sub", reconnect_cap=unit)
        await sub.join("numbers")
        changes = sub.state_changes()
        pub = await open_client(port, "pub", reconnect_cap=unit, max_outbox=200)
        received: list[Any] = []
        reading = asyncio.create_task(collect(sub, received, until=600))
        rng = random.Random(13)
        kills = 0
        for n in range(600):
            await pub.publish("numbers", n)
            if n in (150, 330, 480):  # kill -9 mid-stream, restart on the same port
                await asyncio.sleep(rng.random() * 0.05)
                await asyncio.to_thread(server.restart)
                kills += 1
        await pub.flush(timeout=600 * unit)
        await asyncio.wait_for(reading, timeout=600 * unit)
    finally:
        server.kill()
    assert kills == 3
    assert received == list(range(600))  # none lost, none twice, in order
    resumed = []
    while True:
        try:
            change = await asyncio.wait_for(changes.__anext__(), timeout=0.1)
        except (TimeoutError, StopAsyncIteration):
            break
        if isinstance(change, Reconnected):
            resumed.append(change.resumed)
    assert resumed and all(resumed), resumed  # every reconnect resumed the stored session


async def test_a_clean_restart_resumes_the_session_and_its_rooms(
    tls_files: Any, tmp_path: Path, open_client: OpenClient, unit: float
) -> None:
    server = ServerProcess(server_args(tls_files, tmp_path / "s.db"))
    port = await asyncio.to_thread(server.start)
    try:
        alice = await open_client(port, "alice", reconnect_cap=unit)
        bob = await open_client(port, "bob", reconnect_cap=unit)
        await alice.join("lobby")
        changes = alice.state_changes()
        assert server.stop() == 0
        await asyncio.to_thread(server.start)
        # A line typed while the server restarts reaches the other client (README's chat).
        await bob.publish("lobby", "typed during the restart", confirm=True, timeout=100 * unit)
        got = await alice.receive(timeout=100 * unit)
        assert got.body == "typed during the restart"
        change = None
        while not isinstance(change, Reconnected):
            change = await asyncio.wait_for(changes.__anext__(), timeout=100 * unit)
        assert change.resumed
    finally:
        server.kill()


async def test_a_store_that_is_not_a_store_ends_in_one_sentence(
    tls_files: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database, just some bytes" * 100)
    before = bad.read_bytes()
    server = ServerProcess(server_args(tls_files, bad))
    try:
        await asyncio.to_thread(server.start, 15.0)
    except RuntimeError as exc:
        text = str(exc)
    else:
        raise AssertionError("the server started on a file that is not a store")
    finally:
        server.kill()
    assert "exited with 1" in text
    assert "Traceback" not in text
    assert "bad.db" in text
    assert bad.read_bytes() == before
