"""``securemsg bench datagram`` in small: both channels through the impaired links."""

from __future__ import annotations

import time
from typing import Any

import pytest

from securemsg.bench.datagram import format_datagram_result, run_datagram_bench
from securemsg.bench.lossy import Impairment
from tests.integration.conftest import StartServer

pytestmark = pytest.mark.timeout(60)


async def test_the_lossy_bench_loses_datagrams_and_delays_tls_but_loses_nothing_over_tls(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    started = time.perf_counter()
    result = await run_datagram_bench(
        "127.0.0.1",
        server.port,
        ca=str(tls_files.ca_pem),
        msgs=60,
        rate=600.0,
        size=64,
        impairment=Impairment(loss=0.2, reorder=0.1, delay=0.002),
        handshakes=2,
        timeout=20.0,
    )
    assert time.perf_counter() - started < 45
    dtls, tls = result.channels
    assert (dtls.channel, tls.channel) == ("dtls", "tls")
    # Two lossy legs at 20 %: about 64 % arrive; none twice.
    assert 0.2 < dtls.delivered_fraction < 0.95
    assert dtls.duplicates == 0
    # TLS resends what the link lost: everything arrives once, later.
    assert tls.delivered_fraction == 1.0
    assert tls.duplicates == 0
    assert dtls.p50_ms is not None and tls.p99_ms is not None
    assert dtls.connect_ms > 0 and tls.connect_ms > 0
    text = format_datagram_result(result)
    assert "dtls" in text and "tls" in text and "loss 20%" in text


async def test_a_clean_link_delivers_every_datagram(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    result = await run_datagram_bench(
        "127.0.0.1", server.port, ca=str(tls_files.ca_pem), msgs=30, rate=300.0, handshakes=1
    )
    assert [c.delivered_fraction for c in result.channels] == [1.0, 1.0]
