"""Chaos: the promises of the client and the server, kept under faults, each with a figure.

Every test prints its figure as a ``FIGURE {...}`` line (``pytest -s`` shows it) and appends it
to the file named by ``SECUREMSG_FIGURES``; ``docs/reliability.md`` holds a real run's table.
Faults come from :mod:`tests.faults`: a proxy that cuts, black-holes or refuses, and a server
in a subprocess that is killed, restarted on the same port or sent SIGTERM. Random moments
come from one seeded generator (``SECUREMSG_CHAOS_SEED`` replays a run); the sizes can be
raised for the long versions in ``bench/soak`` (``SECUREMSG_CHAOS_*`` variables below).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import signal
import statistics
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest
from structlog.testing import capture_logs

from securemsg.client.client import (
    Client,
    ClientState,
    Disconnected,
    Reconnected,
    Reconnecting,
    StateChange,
)
from securemsg.errors import TimeoutError
from tests.faults import FaultProxy, ServerProcess, record_figure, wait_until
from tests.integration.conftest import OpenClient

#: Seconds each test may take (pytest-timeout); the long versions raise it.
LIMIT = float(os.environ.get("SECUREMSG_CHAOS_TIMEOUT", 60))
pytestmark = pytest.mark.timeout(LIMIT)

SEED = int(os.environ.get("SECUREMSG_CHAOS_SEED", random.SystemRandom().randrange(10**6)))
#: Sizes of the fast versions; bench/soak raises them.
PROMISE_MESSAGES = int(os.environ.get("SECUREMSG_CHAOS_PROMISE_MESSAGES", 2000))
PROMISE_CUTS = int(os.environ.get("SECUREMSG_CHAOS_PROMISE_CUTS", 10))
STREAM_MESSAGES = int(os.environ.get("SECUREMSG_CHAOS_STREAM_MESSAGES", 10_000))
STREAM_CUTS = int(os.environ.get("SECUREMSG_CHAOS_STREAM_CUTS", 20))
RESTART_CLIENTS = int(os.environ.get("SECUREMSG_CHAOS_RESTART_CLIENTS", 50))
SHUTDOWN_PUBLISHERS = int(os.environ.get("SECUREMSG_CHAOS_SHUTDOWN_PUBLISHERS", 20))


@pytest.fixture
def rng() -> random.Random:
    print(f"SECUREMSG_CHAOS_SEED={SEED}")  # shown with a failure: replays the same moments
    return random.Random(SEED)


@pytest.fixture
def open_client(open_client: OpenClient, unit: float) -> OpenClient:
    """The shared clients, coming back fast after a cut."""

    def open_(port: int, name: str | None, **options: Any) -> Awaitable[Client]:
        options.setdefault("reconnect_base", 0.02)
        options.setdefault("connect_timeout", 20 * unit)
        return open_client(port, name, **options)

    return open_


class Timeline:
    """Every state change of one client, with the loop time it was seen at."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.events: list[tuple[float, StateChange]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._follow(client.state_changes()))

    async def _follow(self, changes: AsyncIterator[StateChange]) -> None:
        async for change in changes:
            self.events.append((self.loop.time(), change))
            self._changed.set()

    def of(self, kind: type, since: float = 0.0) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.events if isinstance(e, kind) and t >= since]

    async def first(self, kind: type, *, since: float, within: float) -> tuple[float, Any]:
        async with asyncio.timeout(within):
            while True:
                found = self.of(kind, since)
                if found:
                    return found[0]
                self._changed.clear()
                await self._changed.wait()

    def back_since(self, faults: int) -> bool:
        """Connected now, and welcomed again after each of ``faults`` earlier faults."""
        return self.client.state is ClientState.CONNECTED and len(self.of(Reconnected)) >= faults

    def stop(self) -> None:
        self._task.cancel()


def server_args(tls_files: Any, **options: object) -> list[str]:
    args = ["--cert", str(tls_files.server_cert), "--key", str(tls_files.server_key)]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def cut_points(rng: random.Random, count: int, total: int) -> list[int]:
    """``count`` received-counts strictly inside (0, total): each at random within a third
    of the spacing around one of ``count`` evenly spaced points, so they are spread over the
    stream and at least a third of the spacing apart."""
    slot = total / (count + 1)
    return [round(slot * (i + 1) + rng.uniform(-slot / 3, slot / 3)) for i in range(count)]


def audit(received: Iterable[tuple[int, int]], per_publisher: int, publishers: int) -> dict:
    """Lost, duplicated and out-of-order messages of one subscriber's (publisher, n) stream."""
    by_publisher: dict[int, list[int]] = {p: [] for p in range(publishers)}
    for publisher, n in received:
        by_publisher[publisher].append(n)
    lost = duplicated = out_of_order = 0
    for numbers in by_publisher.values():
        lost += per_publisher - len(set(numbers))
        duplicated += len(numbers) - len(set(numbers))
        out_of_order += sum(1 for a, b in itertools.pairwise(numbers) if b < a)
    return {"lost": lost, "duplicated": duplicated, "out_of_order": out_of_order}


# -- the promise of issue 4 ----------------------------------------------------------------------


async def test_every_message_arrives_exactly_once_in_order_through_ten_cuts(
    start_server, open_client, rng, unit
) -> None:
    total, cuts_wanted = PROMISE_MESSAGES, PROMISE_CUTS
    server = await start_server()
    beat = {"heartbeat_interval": 2 * unit, "heartbeat_timeout": 6 * unit}
    async with FaultProxy(server.port) as proxy:
        sub = await open_client(proxy.port, "sub", **beat)
        pub = await open_client(proxy.port, "pub", **beat)
        await sub.join("stream")
        timeline = Timeline(sub)
        published = 0

        # A stream, not one burst, so that the cuts land inside it: a quarter second per cut.
        pause = 10 / (total / (cuts_wanted * 0.25))

        async def publish() -> None:
            nonlocal published
            for n in range(total):
                await pub.publish("stream", n)
                published = n + 1
                if n % 10 == 9:
                    await asyncio.sleep(pause)

        publishing = asyncio.create_task(publish())
        points = cut_points(rng, cuts_wanted, total)
        cuts: list[dict[str, int]] = []
        received = []
        async with asyncio.timeout(LIMIT - 15):
            while len(received) < total:
                received.append(await sub.receive(timeout=100 * unit))
                # At each point, or as soon after it as the subscriber is connected again
                # (it may read what it buffered before a cut while it reconnects).
                if points and len(received) >= points[0] and timeline.back_since(len(cuts)):
                    points.pop(0)
                    links = proxy.cut(rst=rng.random() < 0.5)
                    cuts.append({"received": len(received), "published": published, "links": links})
            await publishing
            await pub.flush(timeout=100 * unit)
        with pytest.raises(TimeoutError):
            await sub.receive(timeout=3 * unit)  # and nothing after the last one
        timeline.stop()
    bodies = [m.body for m in received]
    seqs = [m.seq for m in received]
    reconnects = [event for _, event in timeline.of(Reconnected)]
    record_figure(
        "promise: exactly once, in order, through cuts",
        messages=total,
        cuts=len(cuts),
        received_at_cuts=[c["received"] for c in cuts],
        subscriber_reconnects=len(reconnects),
        lost=len(set(range(total)) - set(bodies)),
        duplicated=len(bodies) - len(set(bodies)),
        out_of_order=sum(1 for a, b in itertools.pairwise(bodies) if b < a),
        seed=SEED,
    )
    assert len(cuts) == cuts_wanted
    assert all(0 < c["received"] < total for c in cuts)  # each cut landed mid-stream
    assert all(c["links"] >= 1 for c in cuts)  # and cut something
    assert bodies == list(range(total))
    assert seqs == sorted(set(seqs))
    assert len(reconnects) >= cuts_wanted and all(r.resumed for r in reconnects)


# -- dead peers ----------------------------------------------------------------------------------


@pytest.mark.serial
async def test_clients_behind_a_black_hole_find_it_within_timeout_plus_interval(
    start_server, open_client, unit
) -> None:
    interval, timeout = unit, 3 * unit
    server = await start_server(heartbeat_interval=interval, heartbeat_timeout=timeout)
    loop = asyncio.get_running_loop()
    async with FaultProxy(server.port) as proxy:
        clients = [await open_client(proxy.port, f"c{i}") for i in range(5)]
        timelines = [Timeline(client) for client in clients]
        await asyncio.sleep(3 * interval)  # heartbeats flowing both ways
        proxy.blackhole()
        started = loop.time()
        found = await asyncio.gather(
            *(t.first(Disconnected, since=started, within=30 * unit) for t in timelines)
        )
        proxy.blackhole(False)
        back = await asyncio.gather(
            *(t.first(Reconnected, since=started, within=50 * unit) for t in timelines)
        )
        for timeline in timelines:
            timeline.stop()
    detection = [when - started for when, _ in found]
    record_figure(
        "dead peer: client behind a black hole",
        clients=len(clients),
        detection_min_s=round(min(detection), 3),
        detection_max_s=round(max(detection), 3),
        bound_s=round(timeout + interval, 3),
        heartbeat_timeout_s=round(timeout, 3),
        heartbeat_interval_s=round(interval, 3),
    )
    assert all(event == Disconnected("heartbeat_timeout") for _, event in found)
    assert min(detection) >= timeout - interval - unit / 2
    assert max(detection) <= timeout + interval + 2 * unit  # bound, plus scheduling slack
    assert all(event.resumed for _, event in back)


@pytest.mark.serial
async def test_server_finds_a_sigstopped_client_process_within_heartbeat_timeout(
    start_server, tls_files, unit
) -> None:
    interval, timeout = unit, 4 * unit
    server = await start_server(heartbeat_interval=interval, heartbeat_timeout=timeout)
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "securemsg", "listen", f"localhost:{server.port}",
        "--ca", str(tls_files.ca_pem), "--name", "frozen", "--room", "r", "--json",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with capture_logs() as logs:
            broker = server.broker
            await wait_until(
                lambda: "frozen" in broker.by_name and broker.rooms.match("r"), within=15
            )
            await asyncio.sleep(3 * interval)  # heartbeats flowing both ways
            proc.send_signal(signal.SIGSTOP)
            stopped = loop.time()
            found = await wait_until(
                lambda: any(e["event"] == "heartbeat_timeout" for e in logs),
                within=30 * unit,
                step=0.005,
            )
            detection = found - stopped
            session = server.broker.by_name["frozen"]
            # Detached at once (not after asyncio's 30 s TLS shutdown): resumable until ttl.
            detached = await wait_until(lambda: session.link is None, within=20 * unit)
    finally:
        proc.kill()  # SIGKILL ends a stopped process too
        await proc.wait()
    timed_out = next(e for e in logs if e["event"] == "heartbeat_timeout")
    record_figure(
        "dead peer: server facing a SIGSTOPped client",
        detection_s=round(detection, 3),
        bound_s=round(timeout, 3),
        silence_logged_s=timed_out["silence"],
        detached_after_detection_s=round(detached - found, 3),
        heartbeat_interval_s=round(interval, 3),
    )
    assert timed_out["name"] == "frozen"
    assert timeout - interval - unit / 2 <= detection <= timeout + 2 * unit
    assert detached - found <= 5 * unit  # the dead connection is dropped, not closed politely


# -- server restart ------------------------------------------------------------------------------


async def test_fifty_clients_come_back_after_a_server_restart_and_not_in_lockstep(
    tls_files, open_client, unit
) -> None:
    count = RESTART_CLIENTS
    server = ServerProcess(server_args(tls_files, heartbeat_interval=10 * unit))
    port = await asyncio.to_thread(server.start)
    loop = asyncio.get_running_loop()
    try:
        backoff = {"reconnect_base": unit, "reconnect_cap": 10 * unit}
        clients = [await open_client(port, f"c{i:03}", **backoff) for i in range(count)]
        for client in clients:
            await client.join("all")
        timelines = [Timeline(client) for client in clients]
        killed = loop.time()
        await asyncio.to_thread(server.restart)  # SIGKILL, then a new server on the same port
        listening = loop.time()
        back = await asyncio.gather(
            *(t.first(Reconnected, since=killed, within=LIMIT / 2) for t in timelines)
        )
        times = sorted(when - listening for when, _ in back)
        # When each client started the attempt that brought it back (its last wait's end):
        # lockstep would put most of them in the same few milliseconds. (The returns
        # themselves bunch up when this process is busy with hundreds of handshakes.)
        starts = []
        for timeline, (returned, _) in zip(timelines, back, strict=True):
            waits = [(t, e) for t, e in timeline.of(Reconnecting, killed) if t <= returned]
            starts.append(waits[-1][0] + waits[-1][1].delay - listening)
        crowd = max(collections.Counter(int(t * 100) for t in starts).values())
        delays = [event.delay for t in timelines for _, event in t.of(Reconnecting)]
        for timeline in timelines:
            timeline.stop()
        # The rooms were joined again by themselves: one message reaches the 49 others.
        for client in clients:
            await client.flush(timeout=50 * unit)
        await clients[0].publish("all", "after", confirm=True, timeout=50 * unit)
        for client in clients[1:]:
            assert (await client.receive(timeout=50 * unit)).body == "after"
    finally:
        server.kill()
    record_figure(
        "server restart: clients back",
        clients=count,
        restart_s=round(listening - killed, 3),
        all_back_after_kill_s=round(times[-1] + listening - killed, 3),
        all_back_after_listening_s=round(times[-1], 3),
        first_back_s=round(times[0], 3),
        spread_s=round(times[-1] - times[0], 3),
        stdev_s=round(statistics.pstdev(times), 3),
        last_attempts_spread_s=round(max(starts) - min(starts), 3),
        most_last_attempts_in_one_10ms=crowd,
        distinct_reconnect_delays=len({round(d, 4) for d in delays}),
        reconnect_attempts=len(delays),
        backoff=f"base {backoff['reconnect_base']:g} s, cap {backoff['reconnect_cap']:g} s",
    )
    assert all(event == Reconnected(resumed=False, gap=None) for _, event in back)
    assert times[-1] <= 10 * unit + 20 * unit  # one capped wait, plus a connect
    # Jitter, not lockstep: the returns spread over a good part of the backoff window.
    assert times[-1] - times[0] >= unit
    assert crowd <= max(5, count // 5)


# -- no loss, no duplicates ----------------------------------------------------------------------


async def _stream_under_faults(
    start_server: Any,
    open_client: OpenClient,
    unit: float,
    *,
    fault: Callable[[FaultProxy, int], Awaitable[None]],
    points: list[int],
    total: int,
    publishers: int = 4,
    subscribers: int = 3,
    beat: dict[str, float],
    duration: float,
) -> dict[str, Any]:
    """Publishers stream ``total`` numbered messages to subscribers through a proxy;
    ``fault(proxy, received)`` runs when the first subscriber has received each of
    ``points``. Returns the audit of every subscriber and how the faults landed."""
    server = await start_server(**beat)
    per_publisher = total // publishers
    total = per_publisher * publishers
    loop = asyncio.get_running_loop()
    async with FaultProxy(server.port) as proxy:
        options = {**beat, "connect_timeout": 10 * unit}
        subs = [await open_client(proxy.port, f"sub{i}", **options) for i in range(subscribers)]
        pubs = [await open_client(proxy.port, f"pub{i}", **options) for i in range(publishers)]
        for sub in subs:
            await sub.join("stream")
        first = Timeline(subs[0])
        published = [0] * publishers

        pause = 10 / (per_publisher / duration)  # the stream lasts about ``duration``

        async def publish(p: int) -> None:
            for n in range(per_publisher):
                await pubs[p].publish("stream", [p, n])
                published[p] = n + 1
                if n % 10 == 9:
                    await asyncio.sleep(pause)

        received: list[list[tuple[int, int]]] = [[] for _ in subs]
        landed: list[dict[str, int]] = []

        async def consume(i: int) -> None:
            while len(received[i]) < total:
                message = await subs[i].receive(timeout=100 * unit)
                received[i].append(tuple(message.body))  # type: ignore[arg-type]
                if (
                    i == 0
                    and points
                    and len(received[0]) >= points[0]
                    and first.back_since(len(landed))
                ):
                    points.pop(0)
                    landed.append({"received": len(received[0]), "published": sum(published)})
                    await fault(proxy, len(received[0]))

        started = loop.time()
        async with asyncio.timeout(LIMIT - 10):
            await asyncio.gather(
                *(publish(p) for p in range(publishers)), *(consume(i) for i in range(len(subs)))
            )
            for pub in pubs:
                await pub.flush(timeout=100 * unit)
        elapsed = loop.time() - started
        for sub in subs:
            with pytest.raises(TimeoutError):
                await sub.receive(timeout=2 * unit)
        first.stop()
        audits = [audit(r, per_publisher, publishers) for r in received]
    return {
        "messages": total,
        "publishers": publishers,
        "subscribers": subscribers,
        "landed": landed,
        "elapsed_s": round(elapsed, 2),
        "lost": sum(a["lost"] for a in audits),
        "duplicated": sum(a["duplicated"] for a in audits),
        "out_of_order": sum(a["out_of_order"] for a in audits),
    }


async def test_no_loss_no_duplicates_through_twenty_cuts_of_a_stream(
    start_server, open_client, rng, unit
) -> None:
    total, cuts = STREAM_MESSAGES, STREAM_CUTS
    counted: list[int] = []

    async def cut(proxy: FaultProxy, received: int) -> None:
        counted.append(proxy.cut(rst=rng.random() < 0.5))

    result = await _stream_under_faults(
        start_server, open_client, unit,
        fault=cut, points=cut_points(rng, cuts, total), total=total,
        duration=max(0.25 * cuts, total / 2000),  # a quarter second per cut at least
        beat={"heartbeat_interval": 2 * unit, "heartbeat_timeout": 6 * unit},
    )  # fmt: skip
    landed = result.pop("landed")
    record_figure(
        "no loss: cuts of a stream, several publishers and subscribers",
        **result,
        cuts=len(landed),
        received_at_cuts=[f["received"] for f in landed],
        seed=SEED,
    )
    assert len(landed) == cuts and all(0 < f["received"] < total for f in landed)
    assert all(c >= 1 for c in counted)
    assert (result["lost"], result["duplicated"], result["out_of_order"]) == (0, 0, 0)


async def test_no_loss_no_duplicates_through_a_black_hole_longer_than_the_heartbeat_timeout(
    start_server, open_client, rng, unit
) -> None:
    interval, timeout = unit, 3 * unit
    hole = 1.5 * timeout
    total = STREAM_MESSAGES // 2
    holes: list[float] = []

    async def blackhole(proxy: FaultProxy, received: int) -> None:
        proxy.blackhole()
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(hole)
        proxy.blackhole(False)
        holes.append(asyncio.get_running_loop().time() - started)

    result = await _stream_under_faults(
        start_server, open_client, unit,
        fault=blackhole, points=cut_points(rng, 2, total), total=total,
        duration=max(3 * hole, total / 2000),  # a pace the subscribers keep up with
        beat={"heartbeat_interval": interval, "heartbeat_timeout": timeout},
    )  # fmt: skip
    landed = result.pop("landed")
    record_figure(
        "no loss: black holes longer than the heartbeat timeout",
        **result,
        black_holes=len(landed),
        black_hole_s=[round(h, 3) for h in holes],
        heartbeat_timeout_s=round(timeout, 3),
        received_at_black_holes=[f["received"] for f in landed],
        seed=SEED,
    )
    assert len(landed) == 2 and all(h > timeout for h in holes)
    assert (result["lost"], result["duplicated"], result["out_of_order"]) == (0, 0, 0)


# -- session expiry ------------------------------------------------------------------------------


async def test_a_client_away_longer_than_session_ttl_is_told_it_did_not_resume(
    start_server, open_client, unit
) -> None:
    ttl = 3 * unit
    server = await start_server(session_ttl=ttl)
    loop = asyncio.get_running_loop()
    pub = await open_client(server.port, "pub")
    async with FaultProxy(server.port) as proxy:
        sub = await open_client(proxy.port, "sub", reconnect_cap=unit)
        await sub.join("news")
        await pub.publish("news", "before", confirm=True, timeout=1)
        assert (await sub.receive(timeout=1)).seq == 1
        timeline = Timeline(sub)
        with capture_logs() as logs:
            proxy.refuse()
            proxy.cut()
            left = loop.time()
            await timeline.first(Disconnected, since=left, within=20 * unit)
            await pub.publish("news", "while away", confirm=True, timeout=1)  # lost with it
            await wait_until(
                lambda: any(e["event"] == "session_expired" for e in logs), within=30 * unit
            )
            await asyncio.sleep(unit)
            proxy.refuse(False)
            when, reconnected = await timeline.first(Reconnected, since=left, within=30 * unit)
        away = when - left
        await sub.flush(timeout=1)  # its rooms were joined again
        await pub.publish("news", "after", confirm=True, timeout=1)
        message = await sub.receive(timeout=1)
        timeline.stop()
    record_figure(
        "session expiry reported as a gap",
        away_s=round(away, 3),
        session_ttl_s=round(ttl, 3),
        resumed=reconnected.resumed,
        gap=reconnected.gap,
        first_seq_after=message.seq,
    )
    assert away > ttl
    assert reconnected == Reconnected(resumed=False, gap=None)  # gap: unknown, not hidden
    assert (message.body, message.seq) == ("after", 1)  # "while away" was lost, and said so


# -- graceful shutdown -----------------------------------------------------------------------------


async def test_sigterm_under_load_delivers_every_acknowledged_message_to_every_subscriber(
    tls_files, open_client, unit
) -> None:
    count = SHUTDOWN_PUBLISHERS
    server = ServerProcess(server_args(tls_files, shutdown_timeout=5))
    port = await asyncio.to_thread(server.start)
    loop = asyncio.get_running_loop()
    try:
        subs = [await open_client(port, f"sub{i}") for i in range(3)]
        for sub in subs:
            await sub.join("load")
        pubs = [await open_client(port, f"pub{i}") for i in range(count)]
        acked: list[list[int]] = [[] for _ in pubs]
        received: list[set[tuple[int, int]]] = [set() for _ in subs]
        timelines = [Timeline(sub) for sub in subs]

        async def publish(p: int) -> None:
            for n in range(1_000_000):
                await pubs[p].publish("load", [p, n], confirm=True)
                acked[p].append(n)

        async def consume(i: int) -> None:
            for _ in range(10_000_000):  # until cancelled
                message = await subs[i].receive()
                received[i].add(tuple(message.body))  # type: ignore[arg-type]

        tasks = [asyncio.create_task(publish(p)) for p in range(count)]
        tasks += [asyncio.create_task(consume(i)) for i in range(len(subs))]
        await asyncio.sleep(10 * unit)  # under load
        assert all(acked), "every publisher got acknowledgements before the SIGTERM"
        stopping = loop.time()
        code = await asyncio.to_thread(server.stop)
        stopped = loop.time() - stopping
        for timeline in timelines:
            await timeline.first(Disconnected, since=stopping, within=50 * unit)
        await asyncio.sleep(5 * unit)  # the consumers drain what arrived before the close
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        server.kill()
    reasons = [t.of(Disconnected, stopping)[0][1].reason for t in timelines]
    acknowledged = {(p, n) for p, numbers in enumerate(acked) for n in numbers}
    missing = [len(acknowledged - got) for got in received]
    events = server.events()
    closed = next(e for e in events if e.get("event") == "server_stopped")
    record_figure(
        "graceful shutdown under load (SIGTERM)",
        publishers=count,
        subscribers=len(subs),
        acknowledged=len(acknowledged),
        delivered_per_subscriber=[len(r) for r in received],
        acknowledged_not_delivered=sum(missing),
        shutdown_s=round(stopped, 3),
        exit_code=code,
        connections_closed=closed.get("connections_closed"),
    )
    assert code == 0
    assert reasons == ["server_shutdown"] * len(subs)
    assert missing == [0] * len(subs)
    assert closed.get("connections_closed") == count + len(subs)
