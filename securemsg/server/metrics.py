"""Prometheus metrics and the health endpoints, on an HTTP listener of their own.

Imported only when ``metrics_port`` is set: ``prometheus_client`` (the ``securemsg[metrics]``
extra) is never loaded otherwise. Nothing here is on the message path: the collector reads
the counters the server, its connections and the broker keep anyway, when Prometheus
scrapes, on the event loop's thread (so it sees a consistent state and needs no lock).

The listener answers ``GET /metrics`` (text or OpenMetrics, as the scraper asks),
``GET /healthz`` (200 while the process serves) and ``GET /readyz`` (200 when the server
accepts clients, else 503 with the reasons). One request per connection, bounded in size
and time: this is for a scraper and a load balancer on a private address, not the world.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Protocol

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from securemsg.server.loopwatch import LAG_BUCKETS, LoopWatch

__all__ = ["MetricsListener", "MetricsSource", "ServerCollector"]

logger = structlog.get_logger("securemsg.server.metrics")

_MAX_REQUEST: Final = 8 * 1024
_REQUEST_TIMEOUT: Final = 5.0
_TRAFFIC: Final = ("frames_in", "frames_out", "bytes_in", "bytes_out")


class MetricsSource(Protocol):
    """What the collector reads from the server (:class:`securemsg.server.server.Server`)."""

    connections: Any  # a collection of ServerConnection
    broker: Any
    counts: dict[str, int]
    sessions_expired: int
    refusals: Counter[str]
    handshake_failures: Counter[str]
    closes: Counter[str]
    refused_requests: Counter[str]
    closed_traffic: dict[str, int]
    loopwatch: LoopWatch | None

    @property
    def cert_reloads(self) -> Counter[str]: ...

    @property
    def cert_not_after(self) -> float | None: ...

    def readiness_problems(self) -> list[str]: ...


class ServerCollector(Collector):
    """Reads the server's counters at scrape time; see docs/operations.md for each name."""

    def __init__(self, server: MetricsSource) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        yield _gauge("connections_open", "TLS connections open", len(server.connections))
        yield _counter(
            "connections_accepted", "TCP connections accepted", server.counts, key="accepted"
        )
        yield _by_label(
            "connections_refused", "connections refused before TLS", "reason", server.refusals
        )
        yield _by_label(
            "tls_handshake_failures",
            "connections that failed before TLS was up (plaintext, bad certificate, timeout)",
            "reason",
            server.handshake_failures,
        )
        yield _by_label("connections_closed", "connections closed", "reason", server.closes)
        yield _by_label(
            "requests_refused",
            "requests answered with an error (rate_limited, frame_too_large, ...)",
            "code",
            server.refused_requests,
        )
        yield from self._traffic()
        yield from self._sessions()
        yield from self._certificate()
        yield from self._datagram()
        yield from self._cluster()
        if server.loopwatch is not None:
            yield _lag_histogram(server.loopwatch)

    def _traffic(self) -> Iterator[Metric]:
        server = self.server
        totals = dict(server.closed_traffic)
        buffered = 0
        for conn in list(server.connections):
            core = conn.core
            for name in _TRAFFIC:
                totals[name] = totals.get(name, 0) + getattr(core, name, 0)
            transport = conn.transport
            if transport is not None:
                buffered += transport.get_write_buffer_size()
        yield _counter_value("frames_received", "frames read from clients", totals["frames_in"])
        yield _counter_value("frames_sent", "frames written to clients", totals["frames_out"])
        yield _counter_value("received_bytes", "bytes read from clients", totals["bytes_in"])
        yield _counter_value("sent_bytes", "bytes written to clients", totals["bytes_out"])
        yield _gauge(
            "outgoing_buffered_bytes", "bytes waiting in the connections' write buffers", buffered
        )
        broker = server.broker
        routed = getattr(broker, "messages_routed", None)
        if routed is not None:
            yield _counter_value(
                "messages_routed", "messages queued for delivery to a session", routed
            )
        received = getattr(broker, "messages_received", None)
        if received is not None:
            yield _counter_value(
                "messages_received", "publish and direct messages accepted", received
            )

    def _sessions(self) -> Iterator[Metric]:
        server = self.server
        live = detached = pending = 0
        for session in list(server.broker.by_token.values()):
            if session.link is not None:
                live += 1
            else:
                detached += 1
            pending += len(session.delivery)
        sessions = GaugeMetricFamily(
            "securemsg_sessions", "sessions held, by state", labels=["state"]
        )
        sessions.add_metric(["live"], live)
        sessions.add_metric(["detached"], detached)
        yield sessions
        yield _counter(
            "sessions_attached", "sessions started or resumed", server.counts, key="sessions"
        )
        yield _counter_value(
            "sessions_expired",
            "detached sessions dropped after session_ttl",
            server.sessions_expired,
        )
        yield _gauge("pending_messages", "messages waiting for a client's acknowledgement", pending)

    def _certificate(self) -> Iterator[Metric]:
        server = self.server
        if server.cert_not_after is not None:
            yield _gauge(
                "certificate_expiry_timestamp_seconds",
                "when the server certificate expires (Unix time)",
                server.cert_not_after,
            )
        yield _by_label(
            "certificate_reloads", "certificate reloads, by result", "result", server.cert_reloads
        )

    def _datagram(self) -> Iterator[Metric]:
        listener = getattr(self.server, "datagram", None)
        if listener is None:
            return
        yield _gauge(
            "datagram_associations",
            "DTLS associations, handshaking or established",
            len(listener.table),
        )
        yield _by_label(
            "datagram_events",
            "the DTLS listener's counts (datagrams, cookies, drops, associations, publishes)",
            "event",
            listener.counts,
        )

    def _cluster(self) -> Iterator[Metric]:
        cluster = getattr(self.server, "cluster", None)
        if cluster is None:
            return
        yield _gauge(
            "cluster_available",
            "1 while this node reaches NATS and serves, 0 while it sends clients away",
            1.0 if cluster.available else 0.0,
        )
        yield _gauge(
            "cluster_nodes_live", "nodes heard from within node_timeout", len(cluster.live_nodes())
        )
        yield _gauge(
            "cluster_stream_position",
            "the last message stream position this node carried out",
            cluster.position,
        )
        yield _gauge(
            "cluster_publishes_pending",
            "publishes sent to JetStream and not acknowledged yet",
            cluster.publishes_pending,
        )
        yield _counter_value(
            "cluster_publishes_resent",
            "publishes sent to JetStream again after ack_timeout",
            cluster.resends,
        )
        yield _by_label(
            "cluster_events",
            "what happened to the node and its sessions, by log event name",
            "event",
            cluster.events,
        )


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(f"securemsg_{name}", doc, value=value)


def _counter(name: str, doc: str, counts: Mapping[str, int], *, key: str) -> Metric:
    return _counter_value(name, doc, counts.get(key, 0))


def _counter_value(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(f"securemsg_{name}", doc, value=value)


def _by_label(name: str, doc: str, label: str, counts: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(f"securemsg_{name}", doc, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def _lag_histogram(watch: LoopWatch) -> Metric:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*map(str, LAG_BUCKETS), "+Inf"), watch.bucket_counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(
        "securemsg_event_loop_lag_seconds",
        "how late the event loop ran a timer, sampled every few tenths of a second",
        buckets=buckets,
        sum_value=watch.lag_sum,
    )


def make_registry(server: MetricsSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    ProcessCollector(registry=registry)  # CPU, memory, open files: process_* by convention
    return registry


# -- the HTTP listener ---------------------------------------------------------------------


class MetricsListener:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0 picks one)."""

    def __init__(self, server: MetricsSource, *, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._registry = make_registry(server)
        self._ready: Callable[[], list[str]] = server.readiness_problems
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=_MAX_REQUEST
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metrics_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, content_type, body = self._answer(head)
                writer.write(_response(status, content_type, body, head=head.startswith(b"HEAD")))
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that went away or sent nonsense: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(_header(lines, "accept") or "")
            return "200 OK", content_type, encoder(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            problems = self._ready()
            if problems:
                return "503 Service Unavailable", "text/plain", _lines(problems)
            return "200 OK", "text/plain", b"ready\n"
        return "404 Not Found", "text/plain", b"try /metrics, /healthz or /readyz\n"


def _header(lines: Iterable[str], name: str) -> str | None:
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _lines(items: Iterable[str]) -> bytes:
    return "".join(f"{item}\n" for item in items).encode()


def _response(status: str, content_type: str, body: bytes, *, head: bool) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return header if head else header + body
