"""The metrics and health listener over real sockets: scrape, parse, health, readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from securemsg.core.messages import Delivery, Error, Join, Publish, ServerAck, encode_body

pytestmark = pytest.mark.asyncio


async def http_get(port: int, path: str, *, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def wait_for(condition: Callable[[], object]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the server has no event for these
            await asyncio.sleep(0.01)


async def scrape(port: int) -> dict[str, Any]:
    """Every sample as ``{name: value}`` or ``{name: {label value: value}}`` (one label)."""
    status, body = await http_get(port, "/metrics")
    assert status == 200
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.labels and len(sample.labels) == 1:
                (label,) = sample.labels.values()
                samples.setdefault(sample.name, {})[label] = sample.value
            elif not sample.labels:
                samples[sample.name] = sample.value
            else:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


async def test_metrics_count_connections_messages_and_failures(start_server: Any, raw: Any) -> None:
    server = await start_server(metrics_port=0)
    port = server.metrics.port
    alice, bob = await raw(server.port, "alice"), await raw(server.port, "bob")
    bob.send(Join(room="r", id="j1"))
    await bob.recv_type(ServerAck)
    alice.send(Publish(room="r", body=encode_body("hi"), id="p1"))
    await alice.recv_type(ServerAck)
    await bob.recv_type(Delivery)
    # A plaintext client is refused before TLS: a handshake failure by reason.
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"hello there, plain text\r\n" * 4)
    await writer.drain()
    await wait_for(lambda: server.handshake_failures)
    writer.close()

    samples = await scrape(port)
    assert samples["securemsg_connections_open"] == 2
    assert samples["securemsg_connections_accepted_total"] == 3
    assert samples["securemsg_tls_handshake_failures_total"] == {"plaintext": 1}
    assert samples["securemsg_sessions"] == {"live": 2, "detached": 0}
    assert samples["securemsg_frames_received_total"] >= 4  # 2 hellos, join, publish
    assert samples["securemsg_received_bytes_total"] > 0
    assert samples["securemsg_sent_bytes_total"] > 0
    assert samples["securemsg_messages_routed_total"] == 1
    assert samples["securemsg_event_loop_lag_seconds_count"] >= 0
    assert "+Inf" in samples["securemsg_event_loop_lag_seconds_bucket"]
    assert samples["securemsg_certificate_expiry_timestamp_seconds"] > 0
    assert "process_open_fds" in samples

    # Closed connections keep counting: their traffic moves to the totals, the close reason
    # is counted, and the session stays as detached.
    frames_before = samples["securemsg_frames_received_total"]
    await alice.close()
    await wait_for(lambda: len(server.connections) == 1)
    samples = await scrape(port)
    assert samples["securemsg_connections_open"] == 1
    assert samples["securemsg_frames_received_total"] >= frames_before
    assert samples["securemsg_connections_closed_total"] == {"peer_closed": 1}
    assert samples["securemsg_sessions"] == {"live": 1, "detached": 1}


async def test_health_and_readiness_answer_on_the_metrics_port(start_server: Any) -> None:
    server = await start_server(metrics_port=0)
    port = server.metrics.port
    assert await http_get(port, "/healthz") == (200, b"ok\n")
    assert await http_get(port, "/readyz") == (200, b"ready\n")
    assert (await http_get(port, "/nothing"))[0] == 404
    assert (await http_get(port, "/metrics", method="POST"))[0] == 405
    status, body = await http_get(port, "/metrics", method="HEAD")
    assert (status, body) == (200, b"")


async def test_readiness_fails_while_the_server_shuts_down(start_server: Any) -> None:
    server = await start_server(metrics_port=0)
    server._stopping = True  # what close() sets first; the listener outlives it
    try:
        assert await http_get(server.metrics.port, "/readyz") == (503, b"shutting down\n")
        assert (await http_get(server.metrics.port, "/healthz"))[0] == 200
    finally:
        server._stopping = False


async def test_metrics_are_off_by_default(start_server: Any) -> None:
    server = await start_server()
    assert server.metrics is None


async def test_a_busy_metrics_port_is_one_clear_error(start_server: Any) -> None:
    first = await start_server(metrics_port=0)
    with pytest.raises(Exception, match=r"cannot serve metrics on 127.0.0.1:.*--metrics-port"):
        await start_server(metrics_port=first.metrics.port)


# The connection and the broker count these: ServerConnection adds to
# server.refused_requests[code] where it answers an error, Broker to messages_received for
# each publish and direct it accepts. Until those lines are in, the metrics stay empty.
async def test_refused_requests_and_received_messages_are_counted(
    start_server: Any, raw: Any
) -> None:
    server = await start_server(metrics_port=0, max_msgs_per_sec=1)
    alice = await raw(server.port, "alice")
    alice.send(
        Publish(room="r", body=encode_body(1), id="p1"),
        Publish(room="r", body=encode_body(2), id="p2"),  # over the rate: refused
    )
    error = await alice.recv_type(Error)
    assert error.code == "rate_limited"
    samples = await scrape(server.metrics.port)
    assert samples["securemsg_requests_refused_total"] == {"rate_limited": 1}
    assert samples["securemsg_messages_received_total"] == 1


async def test_metrics_count_the_datagram_channel(start_server: Any, tls_files: Any) -> None:
    from securemsg import datagram

    server = await start_server(metrics_port=0)
    client = await datagram.connect(
        "localhost", server.port, ca=str(tls_files.ca_pem), name="probe"
    )
    try:
        await client.publish("r", 1)
        await client.ping()
        samples = await scrape(server.metrics.port)
    finally:
        await client.close()
    assert samples["securemsg_datagram_associations"] == 1
    events = samples["securemsg_datagram_events_total"]
    assert events["cookies_sent"] == 1
    assert events["associations_opened"] == 1
    assert events["publishes"] == 1
