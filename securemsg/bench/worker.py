"""One publisher or subscriber process of an unpaced run (see :mod:`securemsg.bench.unpaced`).

The coordinator starts this module (``python -m securemsg.bench.worker``, or the worker
subcommand of ``bench/compare.py`` for the other systems) and talks to it in lines:

- the worker prints ``ready`` once it is connected (and, as a subscriber, subscribed);
- the coordinator writes ``go`` to every worker once all of them are ready (the start
  barrier: no message is published before every subscription is held);
- a subscriber prints ``progress N`` a few times a second, and stops counting when it has
  everything, when deliveries stopped for ``--idle-timeout`` seconds, at ``--timeout`` after
  ``go``, or when the coordinator writes ``stop``;
- every worker ends with ``result {json}``; a subscriber writes its latencies (ns, native
  ``array('q')``) to the ``--latencies`` file first.

Times are ``time.perf_counter()`` seconds: CLOCK_MONOTONIC, one clock for every process of
the machine, so the coordinator can take the first publish of one process and the last
delivery of another.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from securemsg.bench.scenarios import Endpoint, System, Tally, make_payload

__all__ = ["PubReport", "SubReport", "add_role_arguments", "run_worker", "shares"]

#: Seconds a worker waits for ``go`` after it said ``ready``.
GO_TIMEOUT: Final = 120.0
#: How often a subscriber reports its count.
_PROGRESS_INTERVAL: Final = 0.2
#: Connections a subscriber process opens at once.
_OPEN_CONCURRENCY: Final = 16


class PubReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one publisher process did."""

    role: str = "pub"
    sent: int
    first_at: float
    published_at: float
    flushed_at: float
    alive: bool
    error: str = ""
    loop: str = ""


class SubscriptionReport(msgspec.Struct, frozen=True, kw_only=True):
    received: int
    duplicated: int
    out_of_order: int
    errors: int
    last_at: float
    alive: bool


class SubReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one subscriber process counted, one entry per subscription."""

    role: str = "sub"
    subscriptions: list[SubscriptionReport]
    stopped_by: str
    #: The longest time, in seconds, no subscription received anything (sampled every
    #: 0.2 s from ``go`` on): a stall shows here before it ends a run by the idle timeout.
    longest_stall: float = 0.0
    loop: str = ""


def shares(count: int, publishers: int) -> list[int]:
    """How many of ``count`` messages each publisher sends."""
    return [count // publishers + (i < count % publishers) for i in range(publishers)]


def add_role_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments the coordinator appends to a worker's command line."""
    parser.add_argument("--role", choices=("pub", "sub"), required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--index", type=int, default=0, help="publisher number")
    parser.add_argument("--publishers", type=int, required=True)
    parser.add_argument("--subscriptions", type=int, default=1)
    parser.add_argument("--count", type=int, required=True, help="messages of all publishers")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True, help="bound after go")
    parser.add_argument("--idle-timeout", type=float, required=True)
    parser.add_argument("--latencies", default="", help="file for a subscriber's latencies")


def _running_loop() -> str:
    """ "uvloop" or "asyncio": the loop this worker really runs on."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Commands:
    """``go`` and ``stop`` from the coordinator on stdin; EOF counts as ``stop``."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._task = loop.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            command = line.strip()
            if command == b"go":
                self.go.set()
            elif command == b"stop":
                self.stop.set()
        self.stop.set()
        self.go.set()  # a coordinator that went away releases a waiting worker

    async def wait_go(self) -> None:
        async with asyncio.timeout(GO_TIMEOUT):
            await self.go.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def run_worker(system: System, args: argparse.Namespace) -> int:
    """Run one worker of ``system`` as ``args`` (from :func:`add_role_arguments`) say."""
    commands = _Commands()
    await commands.start()
    try:
        if args.role == "pub":
            report: PubReport | SubReport = await _publisher(system, args, commands)
        else:
            report = await _subscriber(system, args, commands)
    finally:
        await commands.close()
    _say("result " + msgspec.json.encode(report).decode())
    return 0


async def _publisher(system: System, args: argparse.Namespace, commands: _Commands) -> PubReport:
    endpoint = await system.connect(args.name)
    count = shares(args.count, args.publishers)[args.index]
    chars = args.size - system.body_overhead
    pad = "x" * chars
    index, room, publish = args.index, args.room, endpoint.publish
    _say("ready")
    await commands.wait_go()
    sent, error = 0, ""
    first_at = time.perf_counter()
    published_at = flushed_at = first_at
    try:
        async with asyncio.timeout(args.timeout):
            # As fast as the client lets us: its own buffers and backpressure are the brake.
            while sent < count and not commands.stop.is_set():
                await publish(room, make_payload(index, sent, chars, pad))
                sent += 1
            published_at = time.perf_counter()
            await endpoint.flush(args.timeout)
            flushed_at = time.perf_counter()
    except TimeoutError:
        error = f"stopped at the {args.timeout:g} s bound"
    except Exception as exc:  # a failure: report what was sent
        error = f"{type(exc).__name__}: {exc}"
    alive = endpoint.alive()
    with contextlib.suppress(Exception):
        await endpoint.close()
    return PubReport(
        sent=sent,
        first_at=first_at,
        published_at=published_at,
        flushed_at=flushed_at,
        alive=alive,
        error=error,
        loop=_running_loop(),
    )


async def _open(system: System, names: Sequence[str]) -> list[Endpoint]:
    gate = asyncio.Semaphore(_OPEN_CONCURRENCY)

    async def one(name: str) -> Endpoint:
        async with gate:
            return await system.connect(name)

    return list(await asyncio.gather(*(one(n) for n in names)))


async def _subscriber(system: System, args: argparse.Namespace, commands: _Commands) -> SubReport:
    per_publisher = max(shares(args.count, args.publishers))
    names = [f"{args.name}-{i}" for i in range(args.subscriptions)]
    endpoints = await _open(system, names)
    tallies = [Tally(args.publishers, per_publisher) for _ in endpoints]
    try:
        for endpoint, tally in zip(endpoints, tallies, strict=True):
            await endpoint.subscribe(args.room, tally.add)
        _say("ready")
        await commands.wait_go()
        stopped_by, stall = await _count(tallies, args, commands)
        reports = [
            SubscriptionReport(
                received=t.received,
                duplicated=t.duplicated,
                out_of_order=t.out_of_order,
                errors=t.errors,
                last_at=t.last_at,
                alive=e.alive(),
            )
            for t, e in zip(tallies, endpoints, strict=True)
        ]
        if args.latencies:
            _write_latencies(args.latencies, tallies)
    finally:
        await asyncio.gather(*(e.close() for e in endpoints), return_exceptions=True)
    return SubReport(
        subscriptions=reports,
        stopped_by=stopped_by,
        longest_stall=round(stall, 1),
        loop=_running_loop(),
    )


def _write_latencies(path: str, tallies: Sequence[Tally]) -> None:
    with open(path, "wb") as out:
        for tally in tallies:
            tally.latencies.tofile(out)


async def _count(
    tallies: Sequence[Tally], args: argparse.Namespace, commands: _Commands
) -> tuple[str, float]:
    """Wait until every subscription has every message, deliveries stop for the idle
    timeout, the bound passes or the coordinator says stop: which one it was, and the
    longest stall seen."""
    expected = args.count * len(tallies)
    go_at = time.perf_counter()
    deadline = go_at + args.timeout
    stall = 0.0
    while True:
        total = sum(t.received for t in tallies)
        _say(f"progress {total}")
        now = time.perf_counter()
        last = max(go_at, *(t.last_at for t in tallies))
        stall = max(stall, now - last)
        if total >= expected:
            return "count", stall
        if commands.stop.is_set():
            return "stop", stall
        if now >= deadline:
            return "timeout", stall
        if now - last >= args.idle_timeout:
            return "idle", stall
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_PROGRESS_INTERVAL):
                await commands.stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m securemsg.bench.worker``: a worker against a securemsg server."""
    from securemsg.bench.system import SecureMsgSystem
    from securemsg.log import configure_logging
    from securemsg.runner import run

    parser = argparse.ArgumentParser(prog="python -m securemsg.bench.worker")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca")
    parser.add_argument("--servers", default="", help="cluster nodes, comma-separated")
    add_role_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(level="error", fmt="auto")

    async def work() -> int:
        # Over several nodes, publishers start at the first and subscribers at the second,
        # so every message crosses from one node to another.
        servers = [s for s in args.servers.split(",") if s]
        home = 0 if args.role == "pub" else 1
        system: Any = SecureMsgSystem(args.host, args.port, ca=args.ca, servers=servers, home=home)
        return await run_worker(system, args)

    return run(work())


if __name__ == "__main__":
    sys.exit(main())
