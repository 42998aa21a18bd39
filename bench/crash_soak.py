"""The crash soak of issue 13: python bench/crash_soak.py [--messages 20000] [--json]

A stream of numbered messages from ``--publishers`` publishers (asyncio clients in this
process, never killed) to three subscribers: two ``securemsg listen --session-file ...
--json`` processes, each SIGKILLed and started again ``--subscriber-kills`` times at random
moments, and one asyncio client without a session file in this process. The server runs
with ``--store`` and is SIGKILLed and started again on the same port ``--server-kills``
times at random moments. Every message is acknowledged in the end (the publishers flush);
then each subscriber's output is checked, per publisher:

- lost: published and acknowledged, never received;
- duplicated: received again, not explained by a subscriber kill;
- repeated after a kill: lines of a listen process printed again by its successor (the
  documented bound: at most TAKE_BOUND per kill, client/sessionfile.py);
- out of order: received after a higher number of the same publisher.

Bounded: each phase has a deadline (``--timeout``). Exit status 1 when anything was lost,
duplicated or out of order. ``--json`` prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

import securemsg
from securemsg.client.sessionfile import TAKE_BOUND

ROOM = "soak"
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``securemsg server --store`` on a fixed port, killed and started again."""

    def __init__(self, directory: Path, port: int) -> None:
        self.args = [
            sys.executable, "-m", "securemsg", "server", "--port", str(port),
            "--cert", str(directory / "server.pem"), "--key", str(directory / "server.key"),
            "--store", str(directory / "store.db"), "--session-ttl", "600",
            "--log-format", "json",
        ]  # fmt: skip
        self.log = directory / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def _spawn(self) -> int:
        """Start the process; returns where its log continues."""
        marker = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env=ENV,
            )  # fmt: skip
        return marker

    async def start(self) -> None:
        marker = self._spawn()
        assert self.proc is not None
        for _ in range(300):  # 30 s
            await asyncio.sleep(0.1)
            if b"server_listening" in self.log.read_bytes()[marker:]:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
        raise RuntimeError("the server did not start within 30 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def restart(self) -> None:
        self.kill()
        self.kills += 1
        await self.start()


class Listener:
    """One ``securemsg listen --session-file`` subscriber; each process prints to its own
    file, so what a successor repeats can be told apart from a duplicate."""

    def __init__(self, directory: Path, port: int, name: str) -> None:
        self.directory = directory
        self.name = name
        self.args = [
            sys.executable, "-m", "securemsg", "listen", f"localhost:{port}",
            "--ca", str(directory / "ca.pem"), "--name", name, "--room", ROOM, "--json",
            "--session-file", str(directory / f"{name}.session"),
            "--reconnect-base", "0.05", "--reconnect-cap", "0.5", "--max-attempts", "0",
        ]  # fmt: skip
        self.outputs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        #: Started again after exiting by itself: its first connect found the server down
        #: (``listen`` tries once, as a supervisor such as systemd would start it again).
        self.restarts = 0
        self.stopped = False

    async def supervise(self) -> None:
        while not self.stopped:
            await asyncio.sleep(0.2)
            if self.proc is not None and self.proc.poll() is not None and not self.stopped:
                self.restarts += 1
                self.start()

    def start(self) -> None:
        out = self.directory / f"{self.name}-{len(self.outputs)}.jsonl"
        self.outputs.append(out)
        with out.open("wb") as handle, (self.directory / f"{self.name}.log").open("ab") as err:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=handle, stderr=err, env=ENV
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1
        # No process until the killer starts the next: otherwise the supervisor would see a
        # dead one and start its own, which the killer's start would then orphan (a listen
        # process left running after the soak, retrying forever).
        self.proc = None

    def stop(self) -> None:
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def runs(self) -> list[list[tuple[int, int]]]:
        runs = []
        for out in self.outputs:
            lines = out.read_text().splitlines() if out.exists() else []
            runs.append([_key(json.loads(line)["body"]) for line in lines if line.strip()])
        return runs


def _key(body: Any) -> tuple[int, int]:
    return int(body["p"]), int(body["n"])


def check(
    runs: Iterable[list[tuple[int, int]]], *, publishers: int, per_publisher: int
) -> dict[str, int]:
    """Lost, duplicated, repeated-after-a-kill and out-of-order counts of one subscriber."""
    seen: set[tuple[int, int]] = set()
    highest = [-1] * publishers
    duplicated = repeated = out_of_order = max_repeated = 0
    previous: list[tuple[int, int]] = []
    for run in runs:
        tail = set(previous[-TAKE_BOUND:])  # what a successor may print again
        repeated_here = 0
        for key in run:
            if key in seen:
                if key in tail:
                    repeated_here += 1
                else:
                    duplicated += 1
                continue
            seen.add(key)
            publisher, number = key
            if number < highest[publisher]:
                out_of_order += 1
            highest[publisher] = max(highest[publisher], number)
        repeated += repeated_here
        max_repeated = max(max_repeated, repeated_here)
        if run:  # a process that printed nothing leaves the tail as it was
            previous = run
    return {
        "received": sum(1 for _ in seen),
        "lost": publishers * per_publisher - len(seen),
        "duplicated": duplicated,
        "repeated_after_kill": repeated,
        "max_repeated_per_kill": max_repeated,
        "out_of_order": out_of_order,
    }


async def publish(client: securemsg.Client, index: int, count: int, rate: float) -> None:
    started = time.monotonic()
    for n in range(count):
        await client.publish(ROOM, {"p": index, "n": n})
        if n % 20 == 19:  # paced in small bursts
            delay = started + (n + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    await client.flush(timeout=300)  # every message acknowledged


async def kill_at(times: list[float], action: Any, started: float) -> None:
    for moment in sorted(times):
        delay = started + moment - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await action()


async def soak(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    port = free_port()
    server = Server(directory, port)
    await server.start()
    per_publisher = args.messages // args.publishers
    duration = args.messages / args.rate
    options: dict[str, Any] = {
        "ca": str(directory / "ca.pem"), "reconnect_base": 0.05, "reconnect_cap": 0.5,
        "max_attempts": 0, "connect_timeout": 10.0,
    }  # fmt: skip
    listeners = [Listener(directory, port, f"durable{n}") for n in range(2)]
    supervisors: list[asyncio.Task[None]] = []
    received: list[tuple[int, int]] = []
    clients: list[securemsg.Client] = []
    try:
        plain = await securemsg.connect("localhost", port, name="plain", **options)
        clients.append(plain)
        await plain.join(ROOM)
        reader = asyncio.create_task(_collect(plain, received))
        for listener in listeners:
            listener.start()
        supervisors.extend(asyncio.create_task(listener.supervise()) for listener in listeners)
        for _ in range(300):  # every listener joined before the stream starts
            if {"durable0", "durable1"} <= set(await plain.who(ROOM)):
                break
            await asyncio.sleep(0.1)
        pubs = []
        for index in range(args.publishers):
            pubs.append(await securemsg.connect("localhost", port, name=f"pub{index}", **options))
        clients.extend(pubs)
        started = time.monotonic()

        async def restart_server() -> None:
            await server.restart()

        def killer(listener: Listener) -> Any:
            async def kill_and_restart() -> None:
                for _ in range(100):  # a moment it runs: not while its supervisor restarts it
                    if listener.proc is not None and listener.proc.poll() is None:
                        break
                    await asyncio.sleep(0.05)
                listener.kill()
                await asyncio.sleep(rng.random())
                listener.start()

            return kill_and_restart

        window = max(duration - 1.0, 1.0)
        chaos = [
            kill_at([rng.uniform(0.5, window) for _ in range(args.server_kills)],
                    restart_server, started),
            *(kill_at([rng.uniform(0.5, window) for _ in range(args.subscriber_kills)],
                      killer(listener), started) for listener in listeners),
        ]  # fmt: skip
        rate = args.rate / args.publishers
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(
                *(publish(pub, i, per_publisher, rate) for i, pub in enumerate(pubs)), *chaos
            )
        publish_seconds = time.monotonic() - started
        # Then wait (bounded) until every subscriber has everything, or stops making progress.
        total = per_publisher * args.publishers
        last, quiet = -1, 0.0
        while quiet < 20.0:
            counts = [len(set(received))] + [
                len({key for run in listener.runs() for key in run}) for listener in listeners
            ]
            if min(counts) >= total:
                break
            quiet = 0.0 if sum(counts) != last else quiet + 0.5
            last = sum(counts)
            await asyncio.sleep(0.5)
        reader.cancel()
    finally:
        for listener in listeners:
            listener.stop()
        for task in supervisors:
            task.cancel()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close(timeout=2)
        server.kill()
    subscribers = {"plain (no session file, in process)": check(
        [received], publishers=args.publishers, per_publisher=per_publisher
    )}  # fmt: skip
    for listener in listeners:
        figures = check(listener.runs(), publishers=args.publishers, per_publisher=per_publisher)
        subscribers[f"{listener.name} (session file, process)"] = figures | {
            "kills": listener.kills,
            "restarts_after_failed_connect": listener.restarts,
        }
    return {
        "messages": per_publisher * args.publishers,
        "publishers": args.publishers,
        "server_kills": server.kills,
        "publish_seconds": round(publish_seconds, 1),
        "subscribers": subscribers,
    }


async def _collect(client: securemsg.Client, into: list[tuple[int, int]]) -> None:
    async for message in client:
        into.append(_key(message.body))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="in all (default 20000)")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=400.0, help="messages/s in all")
    parser.add_argument("--server-kills", type=int, default=20)
    parser.add_argument("--subscriber-kills", type=int, default=5, help="per listen process")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on the stream")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    structlog.configure(  # the library's warnings on stderr, not mixed into the figures
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(40),
    )
    directory = Path(tempfile.mkdtemp(prefix="securemsg-crash-soak-"))
    subprocess.run(
        [sys.executable, "-m", "securemsg", "certs", "--dir", str(directory)],
        check=True, capture_output=True, env=ENV, timeout=60,
    )  # fmt: skip
    result = asyncio.run(soak(args, directory))
    if args.keep:
        result["directory"] = str(directory)
    else:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    bad = any(
        figures["lost"] or figures["duplicated"] or figures["out_of_order"]
        for figures in result["subscribers"].values()
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['messages']} messages from {args.publishers} publishers, server "
              f"killed {result['server_kills']} times, published in "
              f"{result['publish_seconds']} s")  # fmt: skip
        print("| subscriber | kills | restarts after a failed connect | received | lost | "
              "duplicated | repeated after a kill (max per kill) | out of order |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for name, f in result["subscribers"].items():
            print(f"| {name} | {f.get('kills', 0)} | {f.get('restarts_after_failed_connect', 0)}"
                  f" | {f['received']} | {f['lost']} | "
                  f"{f['duplicated']} | {f['repeated_after_kill']} "
                  f"({f['max_repeated_per_kill']}) | {f['out_of_order']} |")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
