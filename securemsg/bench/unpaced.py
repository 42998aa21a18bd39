"""Unpaced pub/sub in separate processes, the way ``nats bench`` measures.

Publisher processes publish as fast as their client lets them (its own buffers and
backpressure are the only brake: for securemsg, ``await client.publish(...)`` waiting on the
bounded outbox); subscriber processes count what arrives, each subscription with its own
:class:`~securemsg.bench.scenarios.Tally` (lost, duplicated, out of order). Nothing paces
the publishers, and no publisher shares a process (or a core's time slice) with the
subscribers it measures, so the figure is what the server and the clients sustain.

- ``pubsub``: P publisher processes and S subscriber processes of one subscription each;
- ``fanout``: one publisher process and one subscriber process holding N subscriptions.

The coordinator (this module, in the ``securemsg bench`` process) starts the workers
(:mod:`securemsg.bench.worker`) with the command line the system under test gives
(``System.worker_argv()``), waits until every one of them is connected and subscribed, then
says ``go`` to all (the start barrier). A run ends when every subscription has every
message, or ``idle_timeout`` after the last delivery, and is bounded by ``timeout``: past it
the subscribers are told to stop, and a worker that still has not answered is killed.
Every worker process is reaped before the run returns.

The figure is deliveries (messages x subscriptions) per second from the first publish to the
last delivery; a run where anything was lost, duplicated or reordered has no figure, only
the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from securemsg.bench.scenarios import Outcome, Progress
from securemsg.bench.worker import PubReport, SubReport
from securemsg.errors import SecureMsgError

__all__ = ["IDLE_TIMEOUT", "run_unpaced"]

#: A run ends this long after the last delivery when messages stop arriving.
IDLE_TIMEOUT: Final = 5.0
#: Seconds for every worker to start, connect and subscribe.
_READY_TIMEOUT: Final = 60.0
#: Seconds a worker has to report after it was told to stop, then to exit.
_GRACE: Final = 10.0


@dataclass
class _Worker:
    """One worker process and what it said."""

    role: str
    process: asyncio.subprocess.Process
    stderr_path: Path
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0
    report: PubReport | SubReport | None = None
    reader: asyncio.Task[None] | None = None

    def tell(self, command: str) -> None:
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                stdin.write(command.encode() + b"\n")

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-1500:].strip()
        except OSError:
            return ""


async def _read_lines(worker: _Worker, progress: Progress, workers: Sequence[_Worker]) -> None:
    stdout = worker.process.stdout
    assert stdout is not None
    kind: type[PubReport | SubReport] = PubReport if worker.role == "pub" else SubReport
    try:
        while line := await stdout.readline():
            word, _, rest = line.decode(errors="replace").strip().partition(" ")
            if word == "ready":
                worker.ready.set()
            elif word == "progress":
                worker.received = int(rest)
                progress.done = sum(w.received for w in workers)
            elif word == "result":
                worker.report = msgspec.json.decode(rest, type=kind)
    finally:
        worker.done.set()
        worker.ready.set()  # a worker that died is not waited for


async def _spawn(argv: list[str], role: str, stderr_path: Path) -> _Worker:
    with stderr_path.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    return _Worker(role, process, stderr_path)


async def _reap(workers: Sequence[_Worker]) -> None:
    """Kill whatever still runs and wait for every process."""
    for worker in workers:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
    for worker in workers:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_GRACE):
                await worker.process.wait()
        if worker.reader is not None:
            worker.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.reader


async def run_unpaced(
    system: Any,
    *,
    publishers: int,
    subscriber_processes: int,
    subscriptions: int,
    count: int,
    size: int,
    timeout: float,
    progress: Progress,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Outcome:
    """``publishers`` processes publish ``count`` messages in all to one room held by
    ``subscriber_processes`` processes of ``subscriptions`` subscriptions each."""
    token = secrets.token_hex(3)
    room = f"bench.{token}"
    prefix = f"bench-{system.name}-unpaced-{token}"
    total_subs = subscriber_processes * subscriptions
    progress.total, progress.done, progress.unit = count * total_subs, 0, "deliveries"
    with tempfile.TemporaryDirectory(prefix="securemsg-unpaced-") as tmp:
        directory = Path(tmp)
        common = [
            "--room", room, "--publishers", str(publishers), "--count", str(count),
            "--size", str(size), "--timeout", str(timeout), "--idle-timeout", str(idle_timeout),
        ]  # fmt: skip
        base = list(system.worker_argv())
        workers: list[_Worker] = []
        try:
            for i in range(subscriber_processes):
                argv = [*base, "--role", "sub", "--name", f"{prefix}-s{i}", *common]
                argv += ["--subscriptions", str(subscriptions)]
                argv += ["--latencies", str(directory / f"latencies-{i}")]
                workers.append(await _spawn(argv, "sub", directory / f"sub-{i}.err"))
            for i in range(publishers):
                argv = [*base, "--role", "pub", "--name", f"{prefix}-p{i}", *common]
                argv += ["--index", str(i)]
                workers.append(await _spawn(argv, "pub", directory / f"pub-{i}.err"))
            for worker in workers:
                worker.reader = asyncio.get_running_loop().create_task(
                    _read_lines(worker, progress, workers)
                )
            await _barrier(workers)
            await _run(workers, timeout)
        finally:
            await _reap(workers)
        latencies = _read_latencies(directory, subscriber_processes)
    return _outcome(workers, count=count, total_subs=total_subs, latencies=latencies)


def _read_latencies(directory: Path, processes: int) -> array[int]:
    latencies = array("q")
    for i in range(processes):
        path = directory / f"latencies-{i}"
        if path.exists():
            latencies.frombytes(path.read_bytes())
    return latencies


async def _barrier(workers: Sequence[_Worker]) -> None:
    """Wait until every worker is connected (and subscribed), then start them all."""
    try:
        async with asyncio.timeout(_READY_TIMEOUT):
            for worker in workers:
                await worker.ready.wait()
    except TimeoutError:
        raise SecureMsgError(
            f"the bench workers were not ready within {_READY_TIMEOUT:g} s"
        ) from None
    for worker in workers:
        if worker.done.is_set():  # exited before it was ready: connect or subscribe failed
            raise SecureMsgError(f"a {worker.role} worker failed: {worker.stderr_tail()}")
    # Subscribers first: they start their idle clock at go, publishers their first publish.
    for worker in sorted(workers, key=lambda w: w.role != "sub"):
        worker.tell("go")


async def _run(workers: Sequence[_Worker], timeout: float) -> None:
    """Wait for every report within ``timeout`` (plus the idle time the subscribers take
    themselves), then stop the subscribers and give everyone a grace period."""
    try:
        async with asyncio.timeout(timeout + _GRACE):
            for worker in workers:
                await worker.done.wait()
        return
    except TimeoutError:
        pass
    for worker in workers:
        worker.tell("stop")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_GRACE):
            for worker in workers:
                await worker.done.wait()


def _outcome(
    workers: Sequence[_Worker], *, count: int, total_subs: int, latencies: array[int]
) -> Outcome:
    pubs = [w.report for w in workers if isinstance(w.report, PubReport)]
    subs = [s for w in workers if isinstance(w.report, SubReport) for s in w.report.subscriptions]
    outcome = Outcome(expected=count * total_subs, latencies_ns=latencies)
    outcome.sent = sum(p.sent for p in pubs)
    outcome.received = sum(s.received for s in subs)
    outcome.lost = outcome.expected - outcome.received
    outcome.duplicated = sum(s.duplicated for s in subs)
    outcome.out_of_order = sum(s.out_of_order for s in subs)
    outcome.errors = sum(s.errors for s in subs)
    for worker in workers:
        if worker.report is None:
            outcome.errors += 1
            outcome.notes.append(f"a {worker.role} worker gave no result: {worker.stderr_tail()}")
    outcome.notes += [f"publisher: {p.error}" for p in pubs if p.error]
    if pubs and outcome.sent < count:
        outcome.notes.append(f"the publishers sent {outcome.sent:,} of {count:,} messages")
    stopped = {w.report.stopped_by for w in workers if isinstance(w.report, SubReport)}
    if stopped - {"count"}:
        outcome.notes.append(f"subscribers stopped by: {', '.join(sorted(stopped))}")
    loops = sorted({w.report.loop for w in workers if w.report is not None and w.report.loop})
    if loops:
        outcome.notes.append(f"worker processes ran on {', '.join(loops)}")
    stalls = [w.report.longest_stall for w in workers if isinstance(w.report, SubReport)]
    outcome.extra["longest_stall_s"] = max(stalls, default=0.0)
    cut = sum(not s.alive for s in subs)
    if cut:
        outcome.notes.append(f"{cut} of {len(subs)} subscriptions lost their first connection")
    first = min((p.first_at for p in pubs), default=0.0)
    last = max((s.last_at for s in subs), default=0.0)
    outcome.elapsed = max(1e-9, last - first) if first and last > first else 0.0
    outcome.extra["delivered_pct"] = round(100 * outcome.received / max(1, outcome.expected), 2)
    outcome.extra["subscriptions_cut"] = cut
    if pubs and first:
        published = max(p.published_at for p in pubs) - first
        if published > 0:
            outcome.extra["published_per_s"] = round(outcome.sent / published, 1)
        # Up to the last publisher's flush: for securemsg (and JetStream in bench/compare.py)
        # every publish acknowledged (with a store, committed); NATS core and the relay
        # acknowledge nothing, their flush is a round trip.
        acked = max(p.flushed_at for p in pubs) - first
        if acked > 0 and not any(p.error for p in pubs):
            outcome.extra["acked_per_s"] = round(outcome.sent / acked, 1)
    return outcome
