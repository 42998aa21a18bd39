"""The benchmark scenarios, written once against a small :class:`System` interface.

``securemsg bench`` runs them against a securemsg server (:class:`SecureMsgSystem`, the
ordinary :class:`~securemsg.client.client.Client` with acks, sequence numbers, outbox and
heartbeats on); ``bench/compare.py`` runs the very same code against nats-server and a
websockets relay, so pacing, payloads and verification are identical for every system.

Payloads are ASCII text of a fixed size: publisher number, sequence number and send time
(``perf_counter_ns``, one clock for the whole machine), then padding. A :class:`Tally` per
subscriber checks every delivery: lost, duplicated and out-of-order messages are counted,
never assumed away.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

__all__ = [
    "MIN_SIZE",
    "Endpoint",
    "Outcome",
    "Progress",
    "System",
    "Tally",
    "make_payload",
    "parse_payload",
    "percentiles",
    "proc_cpu_seconds",
    "proc_rss_kb",
    "run_connections",
    "run_handshakes",
    "run_pubsub",
    "run_rtt",
]

#: Publisher number (4 digits), sequence number (10) and send time in ns (20) come first.
_HEADER_CHARS: Final = 34
MIN_SIZE: Final = _HEADER_CHARS + 2
_PAYLOAD: Final = "%04d%010d%020d%s"
#: The shortest sleep of a paced publisher: the timer resolution of uvloop (libuv).
_TIMER_TICK: Final = 0.001
#: Messages a publisher sends between two yields to the event loop when not rate-limited.
_BATCH: Final = 50
#: A run ends this long after the last delivery when messages stop arriving.
_IDLE_TIMEOUT: Final = 5.0

Handler = Callable[[str | bytes], None]


class Endpoint(Protocol):
    """One connected client of the system under test."""

    async def subscribe(self, room: str, handler: Handler) -> None:
        """Hold a subscription to ``room`` (returns once the server holds it); every
        payload received is passed to ``handler``."""

    async def publish(self, room: str, payload: str) -> None:
        """Send ``payload`` to ``room``; may return before it is on the wire."""

    async def serve_echo(self, room: str) -> None:
        """Answer every request sent to ``room`` with its own payload."""

    async def request(self, room: str, payload: str, timeout: float) -> str | bytes:
        """One request/reply round trip through the server."""

    async def flush(self, timeout: float) -> None:
        """Wait until everything published so far reached the server."""

    def alive(self) -> bool:
        """Still on the connection it was opened with (no reconnect, no failure)."""

    async def close(self) -> None: ...


class System(Protocol):
    """A messaging system under test, reached at one address."""

    name: str
    #: Bytes the system adds around a payload to make it a message body (securemsg: the
    #: JSON string quotes), so every system carries bodies of exactly ``size`` bytes.
    body_overhead: int

    async def connect(self, name: str) -> Endpoint: ...

    async def handshake(self) -> None:
        """Open one new connection (TLS and the system's own hello), then close it."""


# -- payloads and statistics ------------------------------------------------------------------


def make_payload(publisher: int, seq: int, chars: int, pad: str) -> str:
    """Publisher, sequence number and send time, padded to ``chars`` characters."""
    # %-formatting: half the cost of the equivalent f-string with format specs, and this runs
    # once per message in every system's publisher.
    tail = pad[: chars - _HEADER_CHARS]
    return _PAYLOAD % (publisher, seq, time.perf_counter_ns(), tail)


def parse_payload(payload: str | bytes) -> tuple[int, int, int]:
    """(publisher, seq, sent_ns) of a payload made by :func:`make_payload`."""
    return int(payload[0:4]), int(payload[4:14]), int(payload[14:34])


class Tally:
    """What one subscriber received: counts, order, duplicates and latencies (ns)."""

    __slots__ = (
        "_high",
        "_seen",
        "duplicated",
        "errors",
        "last_at",
        "latencies",
        "out_of_order",
        "received",
    )

    def __init__(self, publishers: int, per_publisher: int) -> None:
        self._seen = [bytearray(per_publisher) for _ in range(publishers)]
        self._high = [-1] * publishers
        self.received = self.duplicated = self.out_of_order = self.errors = 0
        self.latencies = array("q")
        self.last_at = 0.0

    def add(self, payload: str | bytes) -> None:
        now = time.perf_counter_ns()
        try:
            publisher, seq, sent_ns = parse_payload(payload)
            seen = self._seen[publisher]
            if seen[seq]:
                self.duplicated += 1
                return
            seen[seq] = 1
        except (ValueError, IndexError):
            self.errors += 1
            return
        self.received += 1
        if seq < self._high[publisher]:
            self.out_of_order += 1
        else:
            self._high[publisher] = seq
        self.latencies.append(now - sent_ns)
        self.last_at = now / 1e9


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max, in microseconds (empty when there are no samples)."""
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)
    last = len(ordered) - 1

    def at(q: float) -> float:
        return round(ordered[min(last, int(q * len(ordered)))] / 1000, 1)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p99_9": at(0.999),
        "max": round(ordered[last] / 1000, 1),
    }


def proc_rss_kb(pid: int) -> int | None:
    """Resident memory of process ``pid`` in KiB (Linux /proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time used by process ``pid`` (all threads), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Progress:
    """What a running scenario has done, for the progress bar."""

    total: int = 0
    done: int = 0
    unit: str = "msgs"


@dataclass
class Outcome:
    """What a scenario measured; :mod:`securemsg.bench.run` turns it into the report."""

    sent: int = 0
    expected: int = 0
    received: int = 0
    elapsed: float = 0.0
    latencies_ns: Sequence[int] = ()
    errors: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def unique_prefix(system: System, scenario: str) -> str:
    return f"bench-{system.name}-{scenario}-{secrets.token_hex(3)}"


async def _close_all(endpoints: Sequence[Endpoint]) -> None:
    await asyncio.gather(*(e.close() for e in endpoints), return_exceptions=True)


async def _open_many(
    system: System, names: Sequence[str], *, concurrency: int = 32
) -> list[Endpoint]:
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str) -> Endpoint:
        async with gate:
            return await system.connect(name)

    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await _close_all(opened)
        raise failed[0]
    return opened


# -- pubsub and fanout ------------------------------------------------------------------------


class _Window:
    """Publishers wait while more than ``size`` messages are published and not yet received
    by the slowest subscriber: flow control for the run, so a fast publisher measures the
    server's throughput instead of overrunning its own subscribers in this process."""

    def __init__(self, size: int, tallies: Sequence[Tally], publishers: int) -> None:
        self.size = size
        self.tallies = tallies
        self.sent = 0
        self.publishers = publishers
        self._moved = asyncio.Event()

    def delivered(self) -> None:
        self._moved.set()

    async def wait(self) -> None:
        while self.sent - min(t.received for t in self.tallies) > self.size:
            self._moved.clear()
            await self._moved.wait()


async def _publish(
    endpoint: Endpoint,
    room: str,
    *,
    index: int,
    count: int,
    rate: float,
    chars: int,
    window: _Window,
    progress: Progress,
) -> None:
    pad = "x" * chars
    publish = endpoint.publish
    loop = asyncio.get_running_loop()
    start = loop.time()
    seq = 0
    while seq < count:
        due = min(count, seq + _BATCH)  # behind schedule, catch up a batch at a time
        if rate > 0:
            due = min(due, int((loop.time() - start) * rate) + 1)
        batch = due - seq
        while seq < due:
            await publish(room, make_payload(index, seq, chars, pad))
            seq += 1
        window.sent += batch
        progress.done += batch
        if rate > 0 and seq < count:
            # Never under the loop's timer tick: uvloop counts timers in whole milliseconds and
            # runs a shorter one at once, so a publisher due every 0.5 ms spun a core whatever
            # its rate. What falls due meanwhile leaves as one batch.
            await asyncio.sleep(max(_TIMER_TICK, start + seq / rate - loop.time()))
        else:
            await asyncio.sleep(0)
        await window.wait()


async def run_pubsub(
    system: System,
    *,
    publishers: int,
    subscribers: int,
    count: int,
    size: int,
    rate: float,
    timeout: float,
    window: int,
    progress: Progress,
) -> Outcome:
    """``publishers`` publish ``count`` messages in all to one room of ``subscribers``."""
    prefix = unique_prefix(system, "pubsub")
    room = "bench." + prefix.rsplit("-", 1)[1]
    shares = [count // publishers + (i < count % publishers) for i in range(publishers)]
    tallies = [Tally(publishers, max(shares)) for _ in range(subscribers)]
    flow = _Window(window, tallies, publishers)
    progress.total, progress.unit = count, "msgs"
    subs = await _open_many(system, [f"{prefix}-s{i}" for i in range(subscribers)])
    pubs: list[Endpoint] = []
    try:
        for endpoint, tally in zip(subs, tallies, strict=True):
            await endpoint.subscribe(room, _handler(tally, flow))
        pubs = await _open_many(system, [f"{prefix}-p{i}" for i in range(publishers)])
        chars = size - system.body_overhead
        start = time.perf_counter()
        deadline = start + timeout
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                *(
                    _publish(
                        endpoint,
                        room,
                        index=i,
                        count=shares[i],
                        rate=rate / publishers,
                        chars=chars,
                        window=flow,
                        progress=progress,
                    )
                    for i, endpoint in enumerate(pubs)
                )
            )
            for endpoint in pubs:
                await endpoint.flush(max(0.1, deadline - time.perf_counter()))
        await _until_received(tallies, count, deadline)
        end = max((t.last_at for t in tallies), default=0.0) or time.perf_counter()
    finally:
        await _close_all([*pubs, *subs])
    outcome = _sum_tallies(tallies, expected_each=count)
    outcome.sent = count
    outcome.elapsed = max(1e-9, end - start)
    return outcome


def _handler(tally: Tally, flow: _Window) -> Handler:
    add = tally.add
    moved = flow.delivered

    def handle(payload: str | bytes) -> None:
        add(payload)
        moved()

    return handle


async def _until_received(tallies: Sequence[Tally], expected: int, deadline: float) -> None:
    """Wait until every subscriber has ``expected`` messages, the deadline passes, or
    deliveries stop for a while (the rest are lost, and the run says so)."""
    last_total, last_change = -1, time.perf_counter()
    while True:
        total = sum(t.received for t in tallies)
        now = time.perf_counter()
        if total >= expected * len(tallies) or now >= deadline:
            return
        if total != last_total:
            last_total, last_change = total, now
        elif now - last_change >= _IDLE_TIMEOUT:
            return
        await asyncio.sleep(0.02)


def _sum_tallies(tallies: Sequence[Tally], *, expected_each: int) -> Outcome:
    latencies = array("q")
    for tally in tallies:
        latencies.extend(tally.latencies)
    received = sum(t.received for t in tallies)
    expected = expected_each * len(tallies)
    return Outcome(
        expected=expected,
        received=received,
        latencies_ns=latencies,
        errors=sum(t.errors for t in tallies),
        lost=expected - received,
        duplicated=sum(t.duplicated for t in tallies),
        out_of_order=sum(t.out_of_order for t in tallies),
    )


# -- request/reply ----------------------------------------------------------------------------


async def run_rtt(
    system: System, *, count: int, size: int, timeout: float, progress: Progress
) -> Outcome:
    """``count`` request/reply round trips, one at a time, relayed by the server both ways."""
    prefix = unique_prefix(system, "rtt")
    room = "bench." + prefix.rsplit("-", 1)[1]
    chars = size - system.body_overhead
    pad = "x" * chars
    progress.total, progress.unit = count, "round trips"
    responder, requester = await _open_many(system, [f"{prefix}-echo", f"{prefix}-req"])
    outcome = Outcome(sent=count, expected=count)
    latencies = array("q")
    try:
        await responder.serve_echo(room)
        for seq in range(min(1000, max(10, count // 100))):  # warm up, not counted
            await requester.request(room, make_payload(1, seq, chars, pad), 5.0)
        start = time.perf_counter()
        deadline = start + timeout
        per_request = max(1.0, min(5.0, timeout / 4))
        for seq in range(count):
            if time.perf_counter() >= deadline:
                outcome.notes.append(f"stopped at the {timeout:g} s bound after {seq} requests")
                outcome.expected = seq
                break
            payload = make_payload(0, seq, chars, pad)
            sent = time.perf_counter_ns()
            try:
                reply = await requester.request(room, payload, per_request)
            except Exception as exc:  # a timeout or a failure: this request is lost
                outcome.lost += 1
                outcome.notes.append(f"request {seq}: {type(exc).__name__}")
                continue
            latencies.append(time.perf_counter_ns() - sent)
            if (reply if isinstance(reply, str) else reply.decode()) != payload:
                outcome.errors += 1
            progress.done = seq + 1
        outcome.elapsed = time.perf_counter() - start
    finally:
        await _close_all([requester, responder])
    outcome.received = len(latencies)
    outcome.latencies_ns = latencies
    return outcome


# -- connections and handshakes ---------------------------------------------------------------


async def run_connections(
    system: System,
    *,
    clients: int,
    hold: float,
    server_pid: int | None,
    progress: Progress,
    concurrency: int = 64,
) -> Outcome:
    """Open ``clients`` connections, hold them idle (heartbeats only) for ``hold`` seconds,
    then count the ones still on their first connection; server RSS when ``server_pid``."""
    prefix = unique_prefix(system, "conns")
    progress.total, progress.unit = clients, "connections"
    rss_before = proc_rss_kb(server_pid) if server_pid else None
    gate = asyncio.Semaphore(concurrency)
    outcome = Outcome(expected=clients)

    async def one(index: int) -> Endpoint | None:
        async with gate:
            try:
                endpoint = await system.connect(f"{prefix}-{index}")
            except Exception as exc:
                outcome.errors += 1
                if len(outcome.notes) < 5:
                    outcome.notes.append(f"connect failed: {exc}")
                return None
            progress.done += 1
            return endpoint

    start = time.perf_counter()
    opened = [e for e in await asyncio.gather(*(one(i) for i in range(clients))) if e]
    outcome.sent = len(opened)
    outcome.extra["open_s"] = round(time.perf_counter() - start, 3)
    try:
        await asyncio.sleep(1.0)  # let the server settle (handshake buffers released)
        rss_open = proc_rss_kb(server_pid) if server_pid else None
        progress.total, progress.done, progress.unit = round(hold), 0, "s held"
        held_from = time.perf_counter()
        while (left := held_from + hold - time.perf_counter()) > 0:
            await asyncio.sleep(min(0.25, left))
            progress.done = round(time.perf_counter() - held_from)
        outcome.elapsed = time.perf_counter() - held_from
        alive = sum(1 for e in opened if e.alive())
        rss_held = proc_rss_kb(server_pid) if server_pid else None
    finally:
        await _close_all(opened)
    outcome.received = alive
    outcome.lost = clients - alive - outcome.errors
    outcome.extra |= {"connections": clients, "alive": alive, "held_s": round(hold, 1)}
    if rss_before is not None and rss_open is not None and rss_held is not None and opened:
        outcome.extra |= {
            "server_rss_mb": round(rss_held / 1024, 1),
            "server_rss_kb_per_conn": round((max(rss_open, rss_held) - rss_before) / clients, 1),
        }
    return outcome


async def run_handshakes(
    system: System,
    *,
    count: int,
    concurrency: int,
    server_pid: int | None,
    progress: Progress,
    timeout: float,
) -> Outcome:
    """Open and close ``count`` connections, ``concurrency`` at a time: TLS handshake and
    hello each. Latencies are whole open-and-close times; server CPU when ``server_pid``."""
    progress.total, progress.unit = count, "handshakes"
    outcome = Outcome(sent=count, expected=count)
    latencies = array("q")
    remaining = iter(range(count))
    cpu_before = proc_cpu_seconds(server_pid) if server_pid else None
    start = time.perf_counter()
    deadline = start + timeout

    async def worker() -> None:
        for _ in remaining:
            if time.perf_counter() >= deadline:
                return
            began = time.perf_counter_ns()
            try:
                await system.handshake()
            except Exception as exc:
                outcome.errors += 1
                if len(outcome.notes) < 5:
                    outcome.notes.append(f"handshake failed: {exc}")
                continue
            latencies.append(time.perf_counter_ns() - began)
            progress.done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    outcome.elapsed = time.perf_counter() - start
    cpu_after = proc_cpu_seconds(server_pid) if server_pid else None
    outcome.received = len(latencies)
    outcome.lost = count - outcome.received - outcome.errors
    outcome.latencies_ns = latencies
    outcome.extra["handshakes_per_s"] = round(outcome.received / outcome.elapsed, 1)
    if cpu_before is not None and cpu_after is not None and outcome.received:
        per = (cpu_after - cpu_before) / outcome.received * 1e6
        outcome.extra["server_cpu_us_per_handshake"] = round(per, 1)
    return outcome
