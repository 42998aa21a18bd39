"""What metrics cost the server: python bench/metrics_cost.py [CONNECTIONS]

Metrics add nothing to the message path (the collector reads counters the server keeps
anyway), so their cost is the work done off it: one ``/metrics`` scrape with CONNECTIONS
welcomed TLS clients (default 1000), and one event-loop lag check (run every 0.1 s). Both in
CPU time of the server's process, as a share of one core at the usual rates. The pub/sub
throughput with and without metrics is measured with ``securemsg bench`` (see
docs/operations.md section 11 for the figures).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

from prometheus_client.exposition import generate_latest

from securemsg.config import ServerConfig
from securemsg.core.frames import encode_frame
from securemsg.core.messages import PROTOCOL_VERSION, Hello, encode
from securemsg.log import configure_logging
from securemsg.server.server import Server
from securemsg.tls.contexts import client_context
from securemsg.tls.devcerts import make_dev_pki


async def measure(connections: int, directory: str) -> None:
    pki = make_dev_pki(directory)
    config = ServerConfig(
        port=0, cert=str(pki.server_cert), key=str(pki.server_key), metrics_port=0
    )
    server = Server(config)
    await server.start()
    context = client_context(ca=pki.ca)
    streams = []
    for i in range(connections):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=context, server_hostname="localhost"
        )
        writer.write(encode_frame(encode(Hello(version=PROTOCOL_VERSION, name=f"c{i}"))))
        streams.append((reader, writer))
    for reader, _ in streams:
        await reader.read(4096)  # the welcome
    assert server.metrics is not None and server.loopwatch is not None
    registry = server.metrics._registry
    rounds = 200
    started = time.process_time()
    for _ in range(rounds):
        body = generate_latest(registry)
    scrape = (time.process_time() - started) / rounds
    watch, checks = server.loopwatch, 20_000
    started = time.process_time()
    for _ in range(checks):
        watch.stop()
        watch._check()
    check = (time.process_time() - started) / checks
    print(f"{len(server.connections)} connections, {len(server.broker.sessions())} sessions")
    print(f"one scrape: {scrape * 1e3:.2f} ms CPU, {len(body)} bytes")
    print(f"  every 15 s: {scrape / 15 * 100:.3f} % of a core; every 1 s: {scrape * 100:.2f} %")
    print(f"one lag check: {check * 1e6:.1f} us CPU; 10 a second: {check * 10 * 100:.4f} %")
    for _, writer in streams:
        writer.close()
    await server.close()


def main() -> None:
    configure_logging(level="error")
    connections = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(measure(connections, directory))


if __name__ == "__main__":
    main()
