"""``securemsg bench datagram``: the same telemetry stream over the datagram channel (DTLS
through :class:`~securemsg.bench.lossy.UdpProxy`) and over the TLS channel (through
:class:`~securemsg.bench.lossy.TcpProxy` with the same delay and loss), side by side.

One publisher sends ``msgs`` readings at ``rate`` a second to one room; one subscriber
takes them. Both clients of each channel go through the impaired link, so a reading crosses
it twice. Reported per channel: the median connect time (handshake and ``hello``, through
the link), the fraction of readings delivered, the fraction delivered within ``deadline``
(a reading older than that is worth little to a dashboard), and latency percentiles.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Final

import msgspec

from securemsg.bench.local import LocalServer
from securemsg.bench.lossy import Impairment, TcpProxy, UdpProxy
from securemsg.client.client import connect as tls_connect
from securemsg.client.datagram import connect as dtls_connect
from securemsg.errors import ConfigError, SecureMsgError

__all__ = [
    "ChannelResult",
    "DatagramBenchResult",
    "bench_datagram_main",
    "format_datagram_result",
    "run_datagram_bench",
]

ROOM: Final = "bench.telemetry"
NO_IMPAIRMENT: Final = Impairment()
#: Seconds the subscriber keeps waiting after the last reading was sent.
DRAIN: Final = 1.5


class ChannelResult(msgspec.Struct, frozen=True, kw_only=True):
    channel: str  # "dtls" or "tls"
    #: Median and 90th percentile of the connect times (handshake and hello, through the
    #: link) of ``handshakes`` clients connecting at once.
    connect_ms: float
    connect_p90_ms: float
    sent: int
    delivered: int
    delivered_fraction: float
    on_time_fraction: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    duplicates: int


class DatagramBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    scenario: str = "datagram"
    server: str
    msgs: int
    rate: float
    size: int
    loss: float
    reorder: float
    delay_ms: float
    deadline_ms: float
    handshakes: int
    channels: list[ChannelResult]


async def run_datagram_bench(
    host: str,
    port: int,
    *,
    ca: str | None,
    msgs: int = 2000,
    rate: float = 200.0,
    size: int = 64,
    impairment: Impairment = NO_IMPAIRMENT,
    deadline: float = 0.05,
    handshakes: int = 10,
    timeout: float = 60.0,
) -> DatagramBenchResult:
    """Both channels, DTLS first, each bounded by ``timeout`` seconds."""
    channels = []
    async with asyncio.timeout(2 * timeout):
        async with UdpProxy((host, port), impairment, host="127.0.0.1") as udp:
            side: Any = _DtlsSide(udp.port, ca)
            connects = await _connect_times(side, handshakes, timeout)
            channels.append(await _run(side, msgs, rate, size, deadline, timeout, connects))
        async with TcpProxy((host, port), impairment, host="127.0.0.1") as tcp:
            side = _TlsSide(tcp.port, ca)
            connects = await _connect_times(side, handshakes, timeout)
            channels.append(await _run(side, msgs, rate, size, deadline, timeout, connects))
    return DatagramBenchResult(
        server=f"{host}:{port}",
        msgs=msgs,
        rate=rate,
        size=size,
        loss=impairment.loss,
        reorder=impairment.reorder,
        delay_ms=impairment.delay * 1000,
        deadline_ms=deadline * 1000,
        handshakes=handshakes,
        channels=channels,
    )


class _DtlsSide:
    name = "dtls"

    def __init__(self, port: int, ca: str | None) -> None:
        self.port, self.ca = port, ca

    async def open(self, name: str, timeout: float) -> Any:
        # "localhost": the proxy listens on 127.0.0.1, the certificate names localhost.
        return await dtls_connect("localhost", self.port, ca=self.ca, name=name, timeout=timeout)

    async def publish(self, client: Any, body: Any) -> None:
        await client.publish(ROOM, body)


class _TlsSide(_DtlsSide):
    name = "tls"

    async def open(self, name: str, timeout: float) -> Any:
        return await tls_connect(
            "localhost", self.port, ca=self.ca, name=name, connect_timeout=timeout
        )

    async def publish(self, client: Any, body: Any) -> None:
        await client.publish(ROOM, body)


async def _connect_times(side: Any, count: int, timeout: float) -> list[float]:
    """Seconds each of ``count`` clients connecting at once took to be welcomed."""

    async def one(number: int) -> float:
        started = time.perf_counter()
        client = await side.open(f"bench-hs-{side.name}-{number}", timeout)
        took = time.perf_counter() - started
        await _close(client)
        return took

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def _run(
    side: Any,
    msgs: int,
    rate: float,
    size: int,
    deadline: float,
    timeout: float,
    connect_times: list[float],
) -> ChannelResult:
    subscriber = await side.open(f"bench-sub-{side.name}", timeout)
    publisher = await side.open(f"bench-pub-{side.name}", timeout)
    try:
        await subscriber.join(ROOM, timeout=timeout)
        receiver = asyncio.get_running_loop().create_task(_receive(subscriber, msgs, timeout))
        pad = "x" * max(0, size - 40)
        begin = time.perf_counter()
        for n in range(msgs):
            wait = begin + n / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await side.publish(publisher, {"n": n, "t": time.perf_counter_ns(), "p": pad})
        latencies, duplicates = await receiver
    finally:
        await asyncio.gather(_close(publisher), _close(subscriber))
    latencies.sort()
    delivered = len(latencies)
    connect_times.sort()

    def at(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(delivered - 1, int(q * delivered))] / 1e6, 2)

    return ChannelResult(
        channel=side.name,
        connect_ms=round(statistics.median(connect_times) * 1000, 2),
        connect_p90_ms=round(connect_times[int(0.9 * (len(connect_times) - 1))] * 1000, 2),
        sent=msgs,
        delivered=delivered,
        delivered_fraction=round(delivered / msgs, 4),
        on_time_fraction=round(sum(1 for x in latencies if x <= deadline * 1e9) / msgs, 4),
        p50_ms=at(0.5),
        p99_ms=at(0.99),
        max_ms=at(1.0),
        duplicates=duplicates,
    )


async def _receive(client: Any, msgs: int, timeout: float) -> tuple[list[int], int]:
    """Latencies in ns of the readings that arrived, until all did or the link went quiet
    for :data:`DRAIN` seconds after the last one was due."""
    seen: set[int] = set()
    latencies: list[int] = []
    duplicates = 0
    give_up = time.perf_counter() + timeout
    while len(seen) < msgs and time.perf_counter() < give_up:
        try:
            message = await client.receive(timeout=DRAIN)
        except (TimeoutError, SecureMsgError):
            break
        body = message.body
        if not isinstance(body, dict) or not isinstance(body.get("n"), int):
            continue
        if body["n"] in seen:
            duplicates += 1
            continue
        seen.add(body["n"])
        latencies.append(time.perf_counter_ns() - int(body["t"]))
    return latencies, duplicates


async def _close(client: Any) -> None:
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except (TimeoutError, SecureMsgError, OSError):
        pass


def format_datagram_result(result: DatagramBenchResult) -> str:
    title = (
        f"securemsg bench datagram: {result.msgs:,} readings of {result.size} B at"
        f" {result.rate:g}/s, link loss {result.loss:.0%}, reorder {result.reorder:.0%},"
        f" delay {result.delay_ms:g} ms each way (server {result.server})"
    )
    header = (
        f"  {'channel':<8}{'connect ms':>11}{'p90':>8}{'delivered':>11}"
        f"{'on time':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    lines = [title, header]
    for c in result.channels:
        lines.append(
            f"  {c.channel:<8}{c.connect_ms:>11.1f}{c.connect_p90_ms:>8.1f}"
            f"{c.delivered_fraction:>11.1%}"
            f"{c.on_time_fraction:>9.1%}{_ms(c.p50_ms)}{_ms(c.p99_ms)}{_ms(c.max_ms)}"
        )
    lines.append(
        f"  connect: handshake and hello through the link, median and p90 of"
        f" {result.handshakes} at once; on time: delivered within {result.deadline_ms:g} ms"
    )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.1f}"


async def bench_datagram_main(
    *,
    host: str,
    port: int,
    ca: str | None,
    local: bool,
    msgs: int,
    rate: float,
    size: int,
    loss: float,
    reorder: float,
    delay: float,
    deadline: float,
    json_output: bool,
) -> int:
    """What ``securemsg bench datagram`` runs: maybe start a local server, run, print."""
    try:
        impairment = Impairment(loss=loss, reorder=reorder, delay=delay)
    except ValueError as exc:
        raise ConfigError(f"--loss/--reorder/--delay: {exc}") from None
    if rate <= 0 or msgs < 1:
        raise ConfigError("--rate and --msgs must be above 0")
    options: dict[str, Any] = {
        "msgs": msgs,
        "rate": rate,
        "size": size,
        "impairment": impairment,
        "deadline": deadline,
    }
    if local:
        async with LocalServer() as server:
            result = await run_datagram_bench(server.host, server.port, ca=server.ca, **options)
    else:
        result = await run_datagram_bench(host, port, ca=ca, **options)
    print(msgspec.json.encode(result).decode() if json_output else format_datagram_result(result))
    return 0
