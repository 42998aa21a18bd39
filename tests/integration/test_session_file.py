"""Durable clients (issue 13): a client *process* with a session file that is killed with
SIGKILL and started again resumes its session. Real servers and real client processes
(``sys.executable``) over TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from securemsg.client.sessionfile import TAKE_BOUND
from tests.faults import ServerProcess
from tests.integration.conftest import OpenClient

ROOT = Path(__file__).resolve().parents[2]


def server_args(tls_files: Any) -> list[str]:
    return [
        "--cert", str(tls_files.server_cert), "--key", str(tls_files.server_key),
        "--session-ttl", "60",
    ]  # fmt: skip


def securemsg(*args: str, stdout: IO[bytes] | int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "securemsg", *args],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
    )


def listen_args(port: int, tls_files: Any, session_file: Path) -> list[str]:
    return [
        "listen", f"localhost:{port}", "--ca", str(tls_files.ca_pem), "--name", "sub",
        "--room", "numbers", "--session-file", str(session_file), "--json",
        "--reconnect-base", "0.05", "--reconnect-cap", "0.2",
    ]  # fmt: skip


def bodies(path: Path) -> list[Any]:
    return [json.loads(line)["body"] for line in path.read_text().splitlines() if line]


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)


async def wait_for(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.02)


async def test_a_killed_listen_process_resumes_and_repeats_at_most_the_bound(
    tls_files: Any, tmp_path: Path, open_client: OpenClient, unit: float
) -> None:
    total, kills_at = 600, (150, 380)
    server = ServerProcess(server_args(tls_files))
    port = await asyncio.to_thread(server.start)
    session_file = tmp_path / "sub.session"
    outputs: list[Path] = []
    procs: list[subprocess.Popen[bytes]] = []

    def start_listen() -> None:
        out = tmp_path / f"out-{len(outputs)}.jsonl"
        outputs.append(out)
        with out.open("wb") as handle:
            procs.append(securemsg(*listen_args(port, tls_files, session_file), stdout=handle))

    try:
        pub = await open_client(port, "pub")
        start_listen()
        await wait_for(lambda: session_file.exists(), 100 * unit, "the first session file")
        for _ in range(1000):  # until the listener has joined
            if "sub" in await pub.who("numbers"):
                break
            await asyncio.sleep(0.02)
        for n in range(total):
            await pub.publish("numbers", n)
            await asyncio.sleep(0.004)  # a stream, not a burst: kills land mid-stream
            if n in kills_at:
                kill(procs[-1])  # SIGKILL: no close, no final write
                await asyncio.sleep(0.2)  # messages pile up for the session meanwhile
                start_listen()
        await pub.flush(timeout=100 * unit)
        await wait_for(
            lambda: (bodies(outputs[-1]) or [None])[-1] == total - 1, 300 * unit, "the last line"
        )
    finally:
        for proc in procs:
            kill(proc)
        server.kill()
    runs = [bodies(out) for out in outputs]
    assert len(runs) == len(kills_at) + 1
    for run in runs:
        assert run == list(range(run[0], run[0] + len(run)))  # in order, none twice in a run
    assert runs[0][0] == 0
    for before, after in itertools.pairwise(runs):
        repeated = before[-1] - after[0] + 1
        assert after[0] <= before[-1] + 1, f"lost {after[0] - before[-1] - 1} after a kill"
        assert 0 <= repeated <= TAKE_BOUND, f"{repeated} lines repeated after a kill"
    assert runs[-1][-1] == total - 1


PUBLISHER = """
import asyncio, sys
import structlog
import securemsg

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

async def main(port, ca, path, count):
    client = await securemsg.connect("localhost", port, ca=ca, name="pub", session_file=path,
                                      reconnect_base=0.05, reconnect_cap=0.2)
    print("connected", client.unacknowledged, flush=True)
    if count:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for n in range(count):
            await client.publish("big", {"n": n, "pad": "x" * 32768})
        await asyncio.sleep(1.0)  # the file is written within 0.2 s
        print("published", client.unacknowledged, flush=True)
        await asyncio.sleep(3600)  # killed here
    await client.flush(30)
    print("flushed", client.unacknowledged, flush=True)
    await client.close()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def test_a_killed_publisher_resends_on_restart_and_each_message_arrives_once(
    tls_files: Any, tmp_path: Path, open_client: OpenClient, unit: float
) -> None:
    total = 400  # 13 MB: more than the socket buffers hold while the server is stopped
    server = ServerProcess(server_args(tls_files))
    port = await asyncio.to_thread(server.start)
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    session_file = tmp_path / "pub.session"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def publisher(count: int) -> subprocess.Popen[bytes]:
        args = [str(port), str(tls_files.ca_pem), str(session_file), str(count)]
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip

    received: list[int] = []
    first = second = None
    reading: asyncio.Task[None] | None = None
    try:
        sub = await open_client(port, "sub", max_outbox=10)
        await sub.join("big")

        async def collect() -> None:
            while True:
                received.append((await sub.receive()).body["n"])

        reading = asyncio.create_task(collect())
        first = publisher(total)
        assert first.stdout is not None and first.stdin is not None
        line = await asyncio.to_thread(first.stdout.readline)
        assert line.split() == [b"connected", b"0"]
        server.pause()  # what is sent now is neither carried out nor acknowledged yet
        first.stdin.write(b"go\n")
        first.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(first.stdout.readline), 60)
        assert line.split() == [b"published", str(total).encode()]
        kill(first)  # with all of them unacknowledged
        server.resume()  # it carries out what reached its socket before the kill
        await asyncio.sleep(20 * unit)
        carried_out_before = len(received)
        second = publisher(0)
        out, err = await asyncio.to_thread(second.communicate, timeout=60)
        assert out.split()[:2] == [b"connected", str(total).encode()], err  # the file's outbox
        assert out.split()[2:] == [b"flushed", b"0"], err
        await wait_for(lambda: len(received) >= total, 200 * unit, "every message")
        await asyncio.sleep(5 * unit)  # a duplicate would arrive now
    finally:
        if reading is not None:
            reading.cancel()
        for proc in (first, second):
            if proc is not None:
                kill(proc)
        server.kill()
    assert 0 < carried_out_before < total, carried_out_before  # both halves were exercised
    assert sorted(received) == list(range(total))  # each once: the resends were deduplicated


async def test_a_second_process_on_one_session_file_fails_in_one_sentence(
    tls_files: Any, tmp_path: Path
) -> None:
    server = ServerProcess(server_args(tls_files))
    port = await asyncio.to_thread(server.start)
    session_file = tmp_path / "sub.session"
    first = securemsg(*listen_args(port, tls_files, session_file))
    try:
        await wait_for(lambda: session_file.exists(), 20, "the session file")
        second = securemsg(*listen_args(port, tls_files, session_file))
        _, err = await asyncio.to_thread(second.communicate, timeout=30)
        assert first.poll() is None  # the first one goes on
    finally:
        kill(first)
        server.kill()
    assert second.returncode == 1
    assert err.decode().splitlines() == [
        f"securemsg: session file {session_file} is in use by another process (it holds "
        f"{session_file}.lock); give each process its own session file"
    ]


async def test_a_corrupt_session_file_is_one_sentence_and_left_alone(
    tls_files: Any, tmp_path: Path
) -> None:
    session_file = tmp_path / "sub.session"
    session_file.write_bytes(b'{"format":"securemsg-client-session","outbox":[["1"')
    proc = securemsg(*listen_args(7, tls_files, session_file))  # fails before connecting
    _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1 and f"session file {session_file} is" in lines[0], lines
    assert session_file.read_bytes() == b'{"format":"securemsg-client-session","outbox":[["1"'


async def test_a_closed_client_leaves_what_it_did_not_take_to_its_successor(
    tls_files: Any, tmp_path: Path, open_client: OpenClient, unit: float
) -> None:
    server = ServerProcess(server_args(tls_files))
    port = await asyncio.to_thread(server.start)
    path = str(tmp_path / "sub.session")
    try:
        pub = await open_client(port, "pub")
        sub = await open_client(port, "sub", session_file=path)
        await sub.join("numbers")
        for n in range(50):
            await pub.publish("numbers", n, confirm=True)
        taken = [(await sub.receive(timeout=100 * unit)).body for _ in range(30)]
        await sub.close()
        successor = await open_client(port, None, session_file=path)
        assert successor.name == "sub"
        rest = [(await successor.receive(timeout=100 * unit)).body for _ in range(20)]
    finally:
        server.kill()
    assert taken + rest == list(range(50))


async def test_a_closed_client_resumes_in_its_successor_with_what_came_meanwhile(
    tls_files: Any, tmp_path: Path, open_client: OpenClient, unit: float
) -> None:
    server = ServerProcess(server_args(tls_files))
    port = await asyncio.to_thread(server.start)
    path = str(tmp_path / "sub.session")
    try:
        pub = await open_client(port, "pub")
        sub = await open_client(port, "sub", session_file=path)
        await sub.join("numbers")
        await pub.publish("numbers", 0, confirm=True)
        assert (await sub.receive(timeout=100 * unit)).body == 0
        await sub.close()  # no bye: the server keeps the session for the next process
        for n in range(1, 6):
            await pub.publish("numbers", n, confirm=True)
        successor = await open_client(port, None, session_file=path)
        got = [(await successor.receive(timeout=100 * unit)).body for _ in range(5)]
    finally:
        server.kill()
    assert successor.name == "sub"
    assert got == [1, 2, 3, 4, 5]


async def test_a_kept_session_the_server_no_longer_knows_starts_numbering_over(
    tls_files: Any, tmp_path: Path, open_client: OpenClient, unit: float
) -> None:
    server = ServerProcess(server_args(tls_files))
    port = await asyncio.to_thread(server.start)
    path = tmp_path / "sub.session"
    # As left by a process whose server restarted with its sessions in memory.
    path.write_text(
        '{"format":"securemsg-client-session","version":1,"name":"sub",'
        '"session":"forgotten","last_seq":100,"next_id":7,"outbox":[]}'
    )
    try:
        pub = await open_client(port, "pub")
        sub = await open_client(port, None, session_file=str(path))
        await sub.join("numbers")
        for n in range(3):
            await pub.publish("numbers", n, confirm=True)
        got = [(await sub.receive(timeout=100 * unit)).body for _ in range(3)]
    finally:
        server.kill()
    assert got == [0, 1, 2]  # seq 1, 2, 3 of the new session are not taken for replays


def test_the_blocking_client_keeps_its_session_in_the_file_too(
    tls_files: Any, tmp_path: Path
) -> None:
    from securemsg import sync

    server = ServerProcess(server_args(tls_files))
    port = server.start()
    path = str(tmp_path / "sub.session")
    options: dict[str, Any] = {"ca": str(tls_files.ca_pem), "connect_timeout": 10.0}
    try:
        with sync.connect("localhost", port, name="pub", **options) as pub:
            with sync.connect("localhost", port, name="sub", session_file=path, **options) as sub:
                sub.join("numbers")
            for n in range(3):
                pub.publish("numbers", n, confirm=True)
        with sync.connect("localhost", port, session_file=path, **options) as successor:
            got = [successor.receive(timeout=10).body for _ in range(3)]
            assert successor.name == "sub"
    finally:
        server.kill()
    assert got == [0, 1, 2]
