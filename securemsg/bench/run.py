"""``securemsg bench``: measure a securemsg server the way applications use it.

Like ``nats bench``, it drives a server with real clients and reports messages per second,
MB/s and latency percentiles; unlike a throughput toy, it verifies what arrives (counts,
order, no duplicates) and reports lost, duplicated and out-of-order messages. The clients
are the ordinary :class:`~securemsg.client.client.Client`: acks, sequence numbers, the outbox and
heartbeats stay on, there is no benchmark-only mode.

Scenarios (the code is in :mod:`securemsg.bench.scenarios`):

- ``pubsub``: P publishers, S subscribers, one room;
- ``fanout``: one publisher, N subscribers (``--clients``);
- ``rtt``: request/reply round trips, one at a time, relayed through the server both ways;
- ``connections``: open N idle connections, hold them for ``--duration`` seconds with
  heartbeats, count the survivors, and report server RSS per connection when the server is
  local (``--local``, or ``--server-pid``);
- ``handshakes``: new TLS connections (handshake and hello) per second, and server CPU per
  handshake when the server is local.

By default ``pubsub`` and ``fanout`` run every client in this process, publishers paced by a
window (the throughput of an application that paces itself). With ``--unpaced``
(:mod:`securemsg.bench.unpaced`) publishers and subscribers are processes of their own and
publishers publish as fast as the client allows, as ``nats bench`` measures.

``--local`` starts a server in a subprocess on a fresh development PKI and port, so the
server and the clients each have a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from securemsg import __version__
from securemsg.bench import SCENARIOS
from securemsg.bench.local import LocalServer
from securemsg.bench.scenarios import (
    MIN_SIZE,
    Outcome,
    Progress,
    percentiles,
    run_connections,
    run_handshakes,
    run_pubsub,
    run_rtt,
)
from securemsg.bench.system import SecureMsgSystem
from securemsg.bench.unpaced import run_unpaced
from securemsg.errors import ConfigError
from securemsg.runner import loop_name

__all__ = [
    "SCENARIOS",
    "BenchOptions",
    "BenchResult",
    "LocalServer",
    "SecureMsgSystem",
    "format_result",
    "run_bench",
]

#: Per-scenario defaults for the options left unset on the command line.
DEFAULT_MSGS: Final = {"pubsub": 200_000, "fanout": 5_000, "rtt": 10_000}
DEFAULT_CLIENTS: Final = {"fanout": 100, "connections": 1_000, "handshakes": 1_000}
DEFAULT_DURATION: Final = {"connections": 10.0}
#: The same for ``--unpaced`` (fanout: subscriptions in one subscriber process).
DEFAULT_UNPACED_MSGS: Final = {"pubsub": 200_000, "fanout": 50_000}
DEFAULT_UNPACED_CLIENTS: Final = {"fanout": 20}
#: The bound on a run that has no duration of its own, in seconds.
DEFAULT_BOUND: Final = 60.0


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What to run. ``msgs``, ``clients`` and ``duration`` of None take the scenario's
    default; ``duration`` bounds a message run and is the hold time of ``connections``.
    ``unpaced`` runs pubsub and fanout in separate processes, publishers unpaced."""

    scenario: str
    host: str = "localhost"
    port: int = 7443
    ca: str | None = None
    msgs: int | None = None
    size: int = 128
    duration: float | None = None
    rate: float = 0.0
    pub: int = 1
    sub: int = 1
    clients: int | None = None
    concurrency: int = 8
    window: int = 1_000
    server_pid: int | None = None
    unpaced: bool = False
    #: The nodes of a cluster (``host:port`` each) when several were given.
    servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"unknown scenario {self.scenario!r}: one of {', '.join(SCENARIOS)}")
        if self.size < MIN_SIZE:
            raise ConfigError(f"--size must be at least {MIN_SIZE} bytes (the verification header)")
        for name in ("pub", "sub", "concurrency", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")
        if self.pub > 9999:
            raise ConfigError("--pub must be at most 9999")
        for name in ("msgs", "clients"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1")
        if self.rate < 0 or (self.duration is not None and self.duration <= 0):
            raise ConfigError("--rate must be >= 0 and --duration > 0")
        if self.unpaced and self.scenario not in ("pubsub", "fanout"):
            raise ConfigError("--unpaced applies to pubsub and fanout only")
        if self.unpaced and self.rate:
            raise ConfigError("--unpaced publishes as fast as the client allows: drop --rate")


class Latency(msgspec.Struct, frozen=True):
    """Percentiles in microseconds."""

    p50: float
    p90: float
    p99: float
    p99_9: float
    max: float


class BenchResult(msgspec.Struct, frozen=True, kw_only=True):
    """One run, as printed by ``--json``."""

    scenario: str
    server: str
    system: str = "securemsg"
    #: "paced" (one process, publishers held back by a window) or "unpaced" (--unpaced).
    mode: str = "paced"
    loop: str
    version: str = __version__
    python: str = platform.python_version()
    publishers: int
    subscribers: int
    size: int
    sent: int
    expected: int
    received: int
    elapsed: float
    #: None for an unpaced run that lost, duplicated or reordered anything: no figure.
    msgs_per_s: float | None
    mb_per_s: float
    latency_us: Latency | None
    errors: int
    lost: int
    duplicated: int
    out_of_order: int
    extra: dict[str, float]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not (self.errors or self.lost or self.duplicated or self.out_of_order)


# -- running ------------------------------------------------------------------------------------


async def run_bench(
    options: BenchOptions,
    *,
    system: Any = None,
    progress: Progress | None = None,
    server: str | None = None,
) -> BenchResult:
    """Run ``options.scenario`` against ``system`` (default: securemsg at host:port)."""
    if system is None:
        system = SecureMsgSystem(options.host, options.port, ca=options.ca, servers=options.servers)
    progress = progress or Progress()
    scenario = options.scenario
    unpaced = options.unpaced
    msgs = options.msgs or (DEFAULT_UNPACED_MSGS if unpaced else DEFAULT_MSGS).get(scenario, 0)
    clients = options.clients or (DEFAULT_UNPACED_CLIENTS if unpaced else DEFAULT_CLIENTS).get(
        scenario, 1
    )
    duration = options.duration or DEFAULT_DURATION.get(scenario, DEFAULT_BOUND)
    pub, sub = options.pub, options.sub
    if scenario == "fanout":
        pub, sub = 1, clients
    outcome: Outcome
    if unpaced:
        outcome = await run_unpaced(
            system,
            publishers=pub,
            subscriber_processes=1 if scenario == "fanout" else sub,
            subscriptions=sub if scenario == "fanout" else 1,
            count=msgs,
            size=options.size,
            timeout=duration,
            progress=progress,
        )
    elif scenario in ("pubsub", "fanout"):
        outcome = await run_pubsub(
            system,
            publishers=pub,
            subscribers=sub,
            count=msgs,
            size=options.size,
            rate=options.rate,
            timeout=duration,
            window=options.window,
            progress=progress,
        )
    elif scenario == "rtt":
        pub = sub = 1
        outcome = await run_rtt(
            system, count=msgs, size=options.size, timeout=duration, progress=progress
        )
    elif scenario == "connections":
        pub, sub = 0, clients
        outcome = await run_connections(
            system, clients=clients, hold=duration, server_pid=options.server_pid, progress=progress
        )
    else:
        pub, sub = 0, 0
        outcome = await run_handshakes(
            system,
            count=clients,
            concurrency=options.concurrency,
            server_pid=options.server_pid,
            progress=progress,
            timeout=duration,
        )
    return _result(options, outcome, system, pub=pub, sub=sub, server=server)


def _result(
    options: BenchOptions, outcome: Outcome, system: Any, *, pub: int, sub: int, server: str | None
) -> BenchResult:
    elapsed = outcome.elapsed
    rate: float | None = outcome.received / elapsed if elapsed > 0 else 0.0
    verified = not (outcome.errors or outcome.lost or outcome.duplicated or outcome.out_of_order)
    if options.unpaced and not verified:
        rate = None  # a run with loss is reported as such, never as a throughput figure
    moves_bytes = options.scenario in ("pubsub", "fanout", "rtt")
    quantiles = percentiles(outcome.latencies_ns)
    return BenchResult(
        scenario=options.scenario,
        server=server or ",".join(options.servers) or f"{options.host}:{options.port}",
        system=system.name,
        mode="unpaced" if options.unpaced else "paced",
        loop=loop_name(),
        publishers=pub,
        subscribers=sub,
        size=options.size,
        sent=outcome.sent,
        expected=outcome.expected,
        received=outcome.received,
        elapsed=round(elapsed, 4),
        msgs_per_s=None if rate is None else round(rate, 1),
        mb_per_s=round(rate * options.size / 1e6, 2) if moves_bytes and rate else 0.0,
        latency_us=Latency(**quantiles) if quantiles else None,
        errors=outcome.errors,
        lost=outcome.lost,
        duplicated=outcome.duplicated,
        out_of_order=outcome.out_of_order,
        extra=outcome.extra,
        notes=outcome.notes,
    )


_RATE_LABEL: Final = {
    "pubsub": "deliveries/s",
    "fanout": "deliveries/s",
    "rtt": "round trips/s",
    "connections": "",
    "handshakes": "handshakes/s",
}


def format_result(result: BenchResult) -> str:
    """The summary table printed at the end of a run."""
    shape = {
        "pubsub": f"{result.publishers} publisher(s) -> {result.subscribers} subscriber(s)",
        "fanout": f"1 publisher -> {result.subscribers} subscribers",
        "rtt": "request/reply through the server",
        "connections": f"{result.subscribers} idle connections",
        "handshakes": "new TLS connections (handshake + hello + bye)",
    }[result.scenario]
    if result.mode == "unpaced":
        shape += ", separate processes, unpaced"
    rows: list[tuple[str, str]] = []
    if result.scenario in ("pubsub", "fanout", "rtt"):
        rows.append(("messages", f"{result.sent:,} of {result.size} B"))
    label = _RATE_LABEL[result.scenario]
    if label and result.msgs_per_s is None:
        rows.append((label, "none: not everything arrived once and in order"))
    elif label:
        rows.append((label, f"{result.msgs_per_s:,.0f}"))
    if result.mb_per_s:
        rows.append(("MB/s", f"{result.mb_per_s:,.2f}"))
    if result.latency_us is not None:
        lat = result.latency_us
        rows.append(
            (
                "latency (µs)",
                f"p50 {lat.p50:,.0f}  p90 {lat.p90:,.0f}  p99 {lat.p99:,.0f}"
                f"  p99.9 {lat.p99_9:,.0f}  max {lat.max:,.0f}",
            )
        )
    for key, value in result.extra.items():
        rows.append((key.replace("_", " "), f"{value:,g}"))
    rows.append(("elapsed (s)", f"{result.elapsed:,.3f}"))
    rows.append(("received", f"{result.received:,} of {result.expected:,}"))
    rows.append(
        (
            "verification",
            f"errors {result.errors}  lost {result.lost}  duplicated {result.duplicated}"
            f"  out of order {result.out_of_order}",
        )
    )
    width = max(len(name) for name, _ in rows)
    title = (
        f"{result.system} bench {result.scenario}: {shape}, server {result.server} "
        f"({result.loop}, Python {result.python})"
    )
    lines = [title, *(f"  {name:<{width}}  {value}" for name, value in rows)]
    lines += [f"  note: {note}" for note in result.notes]
    lines.append("  OK" if result.ok else "  FAILED: see the verification line")
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def progress_bar(progress: Progress, *, enabled: bool) -> AsyncIterator[None]:
    """Redraw a one-line progress bar on stderr while the body runs (when ``enabled``)."""
    if not enabled:
        yield
        return
    started = time.perf_counter()

    def draw(final: bool = False) -> None:
        total = max(progress.total, 1)
        share = min(1.0, progress.done / total)
        bar = "#" * int(share * 30)
        spent = time.perf_counter() - started
        text = f"\r[{bar:<30}] {progress.done:,}/{progress.total:,} {progress.unit} {spent:.1f}s"
        sys.stderr.write(text + ("\n" if final else ""))
        sys.stderr.flush()

    async def redraw() -> None:
        while True:
            draw()
            await asyncio.sleep(0.2)

    task = asyncio.get_running_loop().create_task(redraw())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        draw(final=True)


async def bench_main(
    options: BenchOptions,
    *,
    local: bool,
    server_loop: str | None,
    show_progress: bool,
    emit: Callable[[BenchResult], None],
) -> int:
    """What ``securemsg bench`` runs: maybe start a local server, run, report."""
    progress = Progress()
    if not local:
        async with progress_bar(progress, enabled=show_progress):
            result = await run_bench(options, progress=progress)
        emit(result)
        return 0 if result.ok else 1
    clients = options.clients or DEFAULT_CLIENTS.get(options.scenario, 1)
    async with LocalServer(max_connections=max(10_000, clients + 100), loop=server_loop) as srv:
        local_options = BenchOptions(
            **{
                **{name: getattr(options, name) for name in BenchOptions.__slots__},
                "host": srv.host,
                "port": srv.port,
                "ca": srv.ca,
                "server_pid": srv.pid,
            }
        )
        async with progress_bar(progress, enabled=show_progress):
            result = await run_bench(
                local_options, progress=progress, server=f"local pid {srv.pid}"
            )
        logged = srv.warnings()
    if logged:
        events = ", ".join(f"{event} x{n}" for event, n in sorted(logged.items()))
        result = msgspec.structs.replace(result, notes=[*result.notes, f"server logged {events}"])
    emit(result)
    return 0 if result.ok else 1
