"""A reconnect storm: N clients come back at once; what it costs the server, with and
without TLS session tickets.

    python bench/reconnect_storm.py [--clients N] [--rounds R] [--key-type ecdsa|rsa]

N securemsg clients (one process, uvloop when installed) connect to a ``securemsg server``
subprocess through a TCP relay (another subprocess), so that all their connections can be
cut at once without the server noticing more than N resets. Two storms per run:

- **blip**: the relay is killed and started again; the server keeps running, so a client
  that offers the ticket of its last connection resumes (with ``tls_session_tickets``);
- **restart**: the server is SIGKILLed and started again on the same port; its new process
  draws a new ticket key, so every old ticket is refused and every handshake is full.

For each: seconds from the cut until every client is connected again, and the server's
CPU (``/proc/PID/stat``) over that time per reconnect (for a restart, from when the new
process logs ``server_listening``). Runs with ``tls_session_tickets`` 0 and 1 alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the relay (a subprocess: killing it cuts every connection) --------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _relay(listen: int, target: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()


# -- the driver --------------------------------------------------------------------------------


class Processes:
    def __init__(self, directory: Path, *, tickets: int) -> None:
        self.directory, self.tickets = directory, tickets
        self.server_port, self.relay_port = _free_port(), _free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.log = directory / f"server-{tickets}.log"

    def start_server(self) -> float:
        """Start the server; returns its CPU seconds once it listens."""
        argv = [sys.executable, "-m", "securemsg", "server", "--host", "127.0.0.1"]
        argv += ["--port", str(self.server_port), "--cert", str(self.directory / "server.pem")]
        argv += ["--key", str(self.directory / "server.key"), "--max-connections", "20000"]
        argv += ["--tls-session-tickets", str(self.tickets), "--log-format", "json"]
        argv += ["--log-level", "info"]
        self.log.write_bytes(b"")
        with self.log.open("wb") as log:
            self.server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 15
        while b"server_listening" not in self.log.read_bytes():
            if time.monotonic() > deadline or self.server.poll() is not None:
                raise RuntimeError(f"the server did not start: {self.log.read_text()[-500:]}")
            time.sleep(0.02)
        return _cpu(self.server.pid)

    def start_relay(self) -> None:
        argv = [sys.executable, __file__, "relay", str(self.relay_port), str(self.server_port)]
        self.relay = subprocess.Popen(argv, stdout=subprocess.PIPE)
        assert self.relay.stdout is not None
        self.relay.stdout.readline()

    def kill(self, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)

    def resumed(self) -> tuple[int, int]:
        """(resumed, full) handshakes the server's log shows."""
        counts = [0, 0]
        for line in self.log.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "connection_opened" and "tls_resumed" in event:
                    counts[0 if event["tls_resumed"] else 1] += 1
        return counts[0], counts[1]


async def _all_back(clients: list[Any], before: list[Any], timeout: float) -> float:
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if all(
            c._mailbox.conn is not None and c._mailbox.conn is not old
            for c, old in zip(clients, before, strict=True)
        ):
            return time.perf_counter() - started
        await asyncio.sleep(0.01)
    raise TimeoutError("not every client came back")


async def one_run(directory: Path, *, tickets: int, count: int) -> dict[str, float]:
    from securemsg.client.client import connect

    procs = Processes(directory, tickets=tickets)
    procs.start_server()
    procs.start_relay()
    clients = []
    try:
        for index in range(count):
            clients.append(
                await connect(
                    "localhost",
                    procs.relay_port,
                    ca=str(directory / "ca.pem"),
                    name=f"storm-{index}",
                    reconnect_base=0.05,
                    reconnect_cap=0.2,
                )
            )
        figures: dict[str, float] = {}
        # blip: the relay goes, the server stays
        assert procs.server is not None
        before = [c._mailbox.conn for c in clients]
        cpu = _cpu(procs.server.pid)
        procs.kill(procs.relay)
        procs.start_relay()
        figures["blip_s"] = await _all_back(clients, before, 120)
        figures["blip_us"] = (_cpu(procs.server.pid) - cpu) / count * 1e6
        figures["blip_resumed"] = procs.resumed()[0]
        # restart: a new server process on the same port
        before = [c._mailbox.conn for c in clients]
        procs.kill(procs.server)
        cpu = procs.start_server()  # the storm is timed from the new server's listening
        assert procs.server is not None
        figures["restart_s"] = await _all_back(clients, before, 120)
        figures["restart_us"] = (_cpu(procs.server.pid) - cpu) / count * 1e6
        figures["restart_resumed"] = procs.resumed()[0]
        return figures
    finally:
        await asyncio.gather(*(c.close(timeout=2) for c in clients), return_exceptions=True)
        procs.kill(procs.relay)
        procs.kill(procs.server)


def _pki(directory: Path, key_type: trustme.KeyType) -> None:
    ca = trustme.CA(key_type=key_type)
    leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=key_type)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(directory / "server.pem"), append=index > 0)


async def main(args: argparse.Namespace) -> None:
    key_type = trustme.KeyType[args.key_type.upper()]
    results: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="securemsg-storm-") as tmp:
        directory = Path(tmp)
        _pki(directory, key_type)
        for round_ in range(args.rounds):
            for tickets in (0, 1) if round_ % 2 == 0 else (1, 0):
                figures = await one_run(directory, tickets=tickets, count=args.clients)
                results[tickets].append(figures)
                print(
                    f"tickets={tickets} {json.dumps({k: round(v, 3) for k, v in figures.items()})}"
                )
    print(f"{args.clients} clients, {args.key_type} certificate; medians of {args.rounds}:")
    for tickets, runs in results.items():
        cells = {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}
        print(f"  tls_session_tickets={tickets}: {cells}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "relay":
        asyncio.run(_relay(int(sys.argv[2]), int(sys.argv[3])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa")
    arguments = parser.parse_args()
    from securemsg.log import configure_logging
    from securemsg.runner import run

    configure_logging(level="error")
    run(main(arguments))
