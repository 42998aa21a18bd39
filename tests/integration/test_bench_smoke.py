"""``securemsg bench`` with tiny counts: every scenario runs and verifies what it received.

Speed is never asserted here (the machine may be slow or busy); only the verification
fields are: nothing lost, duplicated, out of order or malformed. The full comparison with
other systems is ``bench/compare.py``, run by hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securemsg.bench.run import (
    BenchOptions,
    BenchResult,
    LocalServer,
    SecureMsgSystem,
    format_result,
    run_bench,
)
from securemsg.bench.scenarios import Tally, make_payload, percentiles
from securemsg.errors import ConfigError, SecureMsgError
from tests.integration.conftest import StartServer

pytestmark = pytest.mark.timeout(60)


async def _bench(server_port: int, ca: Any, scenario: str, **options: Any) -> BenchResult:
    opts = BenchOptions(
        scenario=scenario, host="localhost", port=server_port, ca=str(ca), **options
    )
    result = await run_bench(opts)
    assert format_result(result)  # the table renders
    return result


def _assert_verified(result: BenchResult) -> None:
    assert (result.errors, result.lost, result.duplicated, result.out_of_order) == (0, 0, 0, 0)
    assert result.received == result.expected
    assert result.ok


@pytest.mark.parametrize(("pub", "sub"), [(1, 1), (2, 3)])
async def test_pubsub_delivers_every_message_once_in_order(
    start_server: StartServer, tls_files: Any, pub: int, sub: int
) -> None:
    server = await start_server()
    result = await _bench(server.port, tls_files.ca_pem, "pubsub", msgs=300, pub=pub, sub=sub)
    _assert_verified(result)
    assert result.expected == 300 * sub
    assert result.latency_us is not None and result.latency_us.p50 > 0


async def test_fanout_reaches_every_subscriber(start_server: StartServer, tls_files: Any) -> None:
    server = await start_server()
    result = await _bench(server.port, tls_files.ca_pem, "fanout", msgs=50, clients=5)
    _assert_verified(result)
    assert result.subscribers == 5 and result.received == 250


async def test_paced_pubsub_keeps_the_offered_rate_bound(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    result = await _bench(server.port, tls_files.ca_pem, "pubsub", msgs=100, rate=2000.0)
    _assert_verified(result)
    assert result.elapsed >= 0.04  # 100 messages at 2000/s cannot finish much sooner


async def test_rtt_round_trips_echo_their_payload(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    result = await _bench(server.port, tls_files.ca_pem, "rtt", msgs=50)
    _assert_verified(result)
    assert result.latency_us is not None


async def test_connections_stay_alive_and_server_memory_is_reported(
    start_server: StartServer, tls_files: Any, unit: float
) -> None:
    server = await start_server(heartbeat_interval=unit, heartbeat_timeout=5 * unit)
    result = await _bench(
        server.port,
        tls_files.ca_pem,
        "connections",
        clients=10,
        duration=3 * unit,  # a few heartbeats
        server_pid=os.getpid(),
    )
    _assert_verified(result)
    assert result.extra["alive"] == 10
    assert "server_rss_kb_per_conn" in result.extra


async def test_handshakes_are_counted_and_cost_server_cpu(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    result = await _bench(
        server.port, tls_files.ca_pem, "handshakes", clients=10, server_pid=os.getpid()
    )
    _assert_verified(result)
    assert result.extra["handshakes_per_s"] > 0
    assert "server_cpu_us_per_handshake" in result.extra
    await asyncio.sleep(0)
    assert not server.connections or all(c.session is None for c in server.connections)


def test_tally_counts_duplicates_out_of_order_and_garbage() -> None:
    tally = Tally(publishers=1, per_publisher=4)
    for seq in (0, 2, 1, 2):
        tally.add(make_payload(0, seq, 40, "x" * 40))
    tally.add("not a payload")
    assert (tally.received, tally.duplicated, tally.out_of_order, tally.errors) == (3, 1, 1, 1)
    assert percentiles([1000, 2000, 3000])["max"] == 3.0


def test_bench_command_runs_a_local_server_and_prints_json() -> None:
    # A real process: the command configures logging for the whole interpreter.
    done = subprocess.run(
        [sys.executable, "-m", "securemsg", "bench", "rtt", "--local", "--msgs", "20", "--json"],
        capture_output=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    result = json.loads(done.stdout)
    assert result["scenario"] == "rtt" and result["lost"] == 0 and result["received"] == 20
    assert result["latency_us"]["p50"] > 0


# -- unpaced: publisher and subscriber processes ----------------------------------------------


def _assert_consistent(result: BenchResult) -> None:
    """What an unpaced run reports adds up, whatever it lost."""
    assert result.mode == "unpaced"
    assert 0 <= result.received <= result.expected
    assert result.received + result.lost == result.expected
    assert result.extra["delivered_pct"] == round(100 * result.received / result.expected, 2)
    # A run that lost, duplicated or reordered anything has no throughput figure.
    assert (result.msgs_per_s is None) == (not result.ok)
    if result.msgs_per_s is not None:
        assert result.msgs_per_s > 0 and result.elapsed > 0


@pytest.mark.parametrize(("pub", "sub"), [(1, 1), (2, 3)])
async def test_unpaced_pubsub_counts_what_the_subscriber_processes_received(
    start_server: StartServer, tls_files: Any, pub: int, sub: int
) -> None:
    server = await start_server()
    result = await _bench(
        server.port, tls_files.ca_pem, "pubsub", msgs=2_000, pub=pub, sub=sub, unpaced=True
    )
    _assert_consistent(result)
    assert (result.publishers, result.subscribers, result.expected) == (pub, sub, 2_000 * sub)
    assert result.sent == 2_000
    assert result.extra["published_per_s"] > 0
    # 2,000 messages stay far below every server limit (max_pending 10,000), so the
    # instrument must see all of them, once and in order.
    _assert_verified(result)


async def test_unpaced_fanout_holds_every_subscription_in_one_process(
    start_server: StartServer, tls_files: Any
) -> None:
    server = await start_server()
    result = await _bench(
        server.port, tls_files.ca_pem, "fanout", msgs=200, clients=4, unpaced=True
    )
    _assert_consistent(result)
    assert result.subscribers == 4 and result.expected == 800
    _assert_verified(result)


async def test_unpaced_run_reports_loss_duplicates_and_disorder_without_a_figure(
    start_server: StartServer, tls_files: Any
) -> None:
    # The publisher process skips message 3, sends 5 twice and 8 after 9 (the worker script).
    script = Path(__file__).with_name("bench_faulty_worker.py")

    class Faulty(SecureMsgSystem):
        def worker_argv(self) -> list[str]:
            return [sys.executable, str(script), *super().worker_argv()[3:]]

    server = await start_server()
    options = BenchOptions(
        scenario="fanout", port=server.port, ca=str(tls_files.ca_pem), msgs=20, clients=2,
        unpaced=True,
    )  # fmt: skip
    result = await run_bench(options, system=Faulty("localhost", server.port, ca=options.ca))
    _assert_consistent(result)
    assert (result.lost, result.duplicated, result.out_of_order) == (2, 2, 2)
    assert result.received == 2 * 19 and result.msgs_per_s is None
    assert "none" in format_result(result) and "FAILED" in format_result(result)


async def test_unpaced_pubsub_through_the_session_store_counts_acknowledged_publishes(
    start_server: StartServer, tls_files: Any, tmp_path: Path
) -> None:
    # The securemsg side of bench/compare.py's durable scenario (JetStream is run by hand).
    server = await start_server(store=str(tmp_path / "sessions.db"))
    result = await _bench(server.port, tls_files.ca_pem, "pubsub", msgs=2_000, unpaced=True)
    _assert_consistent(result)
    _assert_verified(result)
    acked, published = result.extra["acked_per_s"], result.extra["published_per_s"]
    # The last acknowledgement comes no sooner than the last publish (both rounded to 0.1).
    assert 0 < acked <= published + 0.1
    assert (tmp_path / "sessions.db").stat().st_size > 0


def test_unpaced_applies_to_pubsub_and_fanout_without_a_rate() -> None:
    with pytest.raises(ConfigError, match="pubsub and fanout"):
        BenchOptions(scenario="rtt", unpaced=True)
    with pytest.raises(ConfigError, match="--rate"):
        BenchOptions(scenario="pubsub", unpaced=True, rate=1000.0)


def test_bench_command_runs_unpaced_pubsub_in_separate_processes() -> None:
    argv = [sys.executable, "-m", "securemsg", "bench", "pubsub", "--local", "--unpaced"]
    done = subprocess.run(
        [*argv, "--msgs", "500", "--json"], capture_output=True, timeout=50, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    result = json.loads(done.stdout)
    assert result["mode"] == "unpaced" and result["received"] == 500
    assert result["msgs_per_s"] > 0 and result["lost"] == 0


async def test_unpaced_run_fails_in_one_sentence_when_a_worker_cannot_start() -> None:
    class Broken(SecureMsgSystem):
        def worker_argv(self) -> list[str]:
            return [sys.executable, "-c", "import sys; sys.exit('no server here')"]

    options = BenchOptions(scenario="pubsub", msgs=10, unpaced=True)
    with pytest.raises(SecureMsgError, match="sub worker failed: no server here"):
        await run_bench(options, system=Broken("localhost", 1, ca=None))


def test_local_server_counts_the_warnings_of_its_log_but_not_its_own_probe(
    tmp_path: Path,
) -> None:
    lines = [
        {"event": "tls_handshake_failed", "reason": "eof", "level": "warning"},  # the probe
        {"event": "server_started", "level": "info"},
        {"event": "session_overflowed", "pending": 10, "level": "warning"},
        {"event": "session_overflowed", "pending": 10, "level": "warning"},
    ]
    log = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    (tmp_path / "server.log").write_text(log)
    assert LocalServer(directory=str(tmp_path)).warnings() == {"session_overflowed": 2}
