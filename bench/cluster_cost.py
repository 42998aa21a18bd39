"""What the cluster costs: python bench/cluster_cost.py [--rounds 2] [--quick] [--json]

Unpaced pub/sub (1 -> 1) and fan-out (1 -> 20 subscriptions in one subscriber process),
publishers and subscribers in processes of their own (:mod:`securemsg.bench.unpaced`, the
machinery of ``securemsg bench --unpaced``), against:

- ``1 node``: one securemsg server, no cluster (the single-server default);
- ``1 node + cluster``: one securemsg node with ``--cluster`` (a nats-server with JetStream
  beside it): every message goes through the stream and back before it is delivered;
- ``2 nodes``: two nodes of one cluster, the publisher on the first and the subscribers on
  the second, so every message crosses from node to node through NATS;
- ``NATS 2-node cluster``: two nats-servers joined by a route (TLS for clients), driven by
  nats-py, the publisher on the first and the subscribers on the second (core NATS: no
  acknowledgement, no replay; the peer's floor, not its equal);

every run a fresh set of processes on 127.0.0.1, one development PKI, 100 % delivered
checked (a run that lost, duplicated or reordered anything has no figure). Besides
deliveries/s it reads each server process's CPU time (``/proc/PID/stat``) before and after
the run: CPU µs per message per server process, the figure to size a cluster with. On a
2-core machine every process competes for the same two cores: the point is the overhead
per message and correctness, not scale.

Subcommand used internally: ``worker`` (one publisher or subscriber process of the NATS
cluster run: publishers connect to ``--pub-port``, subscribers to ``--sub-port``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CONFIGS = ("1 node", "1 node + cluster", "2 nodes", "NATS 2-node cluster")
#: Seconds one run may take (each bounds itself; this is the backstop).
RUN_BOUND = 180.0


@dataclass(frozen=True)
class Scenario:
    key: str
    scenario: str
    msgs: int
    clients: int | None = None


def scenarios(quick: bool) -> list[Scenario]:
    scale = 0.1 if quick else 1.0
    return [
        Scenario("pubsub 1 -> 1", "pubsub", int(100_000 * scale)),
        Scenario("fanout 1 -> 20", "fanout", int(20_000 * scale), clients=20),
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NatsClusterSystem:
    """Core NATS over a 2-server cluster: publishers on one server, subscribers on the other."""

    name = "nats"
    body_overhead = 0

    def __init__(self, pub_port: int, sub_port: int, ca: str) -> None:
        self.pub_port, self.sub_port, self.ca = pub_port, sub_port, ca

    def worker_argv(self) -> list[str]:
        argv = [sys.executable, __file__, "worker", "--pub-port", str(self.pub_port)]
        return [*argv, "--sub-port", str(self.sub_port), "--ca", self.ca]


@contextlib.contextmanager
def processes(
    config: str, directory: Path, pki: Any, node_path: str | None, node_options: list[str]
) -> Iterator[tuple[Any, dict[str, int]]]:
    """The servers of ``config``: (the system to bench, the pid of each server process)."""
    from securemsg.bench.cluster import NatsServer, NodeProcess, free_port, node_env
    from securemsg.bench.system import SecureMsgSystem

    started: list[Any] = []
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    directory = Path(tempfile.mkdtemp(prefix="run-", dir=directory))  # fresh stores and logs
    try:
        if config == "NATS 2-node cluster":
            ports = [free_port(), free_port()]
            for i in range(2):
                server = NatsServer(
                    directory,
                    name=f"nats{i}",
                    jetstream=False,
                    cluster_port=ports[i],
                    routes=[f"nats://127.0.0.1:{ports[1 - i]}"],
                    tls=(cert, key),
                )
                started.append(server)
                server.start()
            wait_routed(started[0].port, started[1].port, ca)
            pids = {s.name: s.pid for s in started}
            yield NatsClusterSystem(started[0].port, started[1].port, ca), pids
            return
        cluster = None
        if config != "1 node":
            nats = NatsServer(directory)
            started.append(nats)
            nats.start()
            cluster = nats.url
        count = 2 if config == "2 nodes" else 1
        nodes = []
        for i in range(count):
            node = NodeProcess(
                directory,
                name=f"node{i}",
                cluster=cluster,
                cert=cert,
                key=key,
                ca=ca,
                options=["--log-level", "warning", "--max-connections", "1000", *node_options],
                env=node_env(node_path),
            )
            started.append(node)
            node.start()
            nodes.append(node)
        servers = [node.address for node in nodes] if count > 1 else []
        system = SecureMsgSystem("127.0.0.1", nodes[0].port, ca=ca, servers=servers)
        yield system, {p.name: p.pid for p in started}
    finally:
        for process in reversed(started):
            process.stop()


def wait_routed(pub_port: int, sub_port: int, ca: str, timeout: float = 15.0) -> None:
    """Until a message published on one server reaches a subscriber on the other."""

    async def check() -> None:
        import ssl

        import nats

        context = ssl.create_default_context(cafile=ca)
        url = "tls://127.0.0.1:{}"
        sub_nc = await nats.connect(url.format(sub_port), tls=context, tls_hostname="127.0.0.1")
        pub_nc = await nats.connect(url.format(pub_port), tls=context, tls_hostname="127.0.0.1")
        try:
            sub = await sub_nc.subscribe("routed")
            await sub_nc.flush()
            async with asyncio.timeout(timeout):
                while True:
                    await pub_nc.publish("routed", b"?")
                    await pub_nc.flush()
                    with contextlib.suppress(Exception):
                        await sub.next_msg(timeout=0.2)
                        return
        finally:
            await sub_nc.close()
            await pub_nc.close()

    asyncio.run(check())


def run_one(
    config: str, scenario: Scenario, directory: Path, pki: Any, args: argparse.Namespace
) -> dict[str, Any]:
    from securemsg.bench.run import BenchOptions, run_bench
    from securemsg.runner import run

    node_options = args.node_option or []
    with processes(config, directory, pki, args.node_path, node_options) as (system, pids):
        options = BenchOptions(
            scenario=scenario.scenario,
            ca=str(pki.ca),
            msgs=scenario.msgs,
            clients=scenario.clients,
            unpaced=True,
            duration=RUN_BOUND - 30,
        )
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result = run(run_bench(options, system=system, server=config))
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    per_message = {name: round(1e6 * s / max(1, result.sent), 1) for name, s in cpu.items()}
    return {
        "config": config,
        "scenario": scenario.key,
        "msgs_per_s": result.msgs_per_s,
        "delivered_pct": result.extra.get("delivered_pct"),
        "p50_us": result.latency_us.p50 if result.latency_us else None,
        "p99_us": result.latency_us.p99 if result.latency_us else None,
        "cpu_us_per_msg": per_message,
        "ok": result.ok,
        "notes": result.notes,
    }


def report(runs: list[dict[str, Any]], scenario_keys: list[str]) -> str:
    lines = [
        "| scenario | system | deliveries/s (median) | min-max | delivered "
        "| latency p50 / p99, last round (ms) | server CPU µs per message published, per process |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in scenario_keys:
        for config in CONFIGS:
            mine = [r for r in runs if r["scenario"] == key and r["config"] == config]
            if not mine:
                continue
            rates = [r["msgs_per_s"] for r in mine if r["msgs_per_s"]]
            rate = f"{statistics.median(rates):,.0f}" if rates else "no figure (loss)"
            spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "-"
            delivered = min(r["delivered_pct"] or 0 for r in mine)
            last = mine[-1]
            latency = (
                f"{last['p50_us'] / 1000:.1f} / {last['p99_us'] / 1000:.1f}"
                if last["p50_us"]
                else "-"
            )
            cpu = " + ".join(
                f"{name} {statistics.median(r['cpu_us_per_msg'][name] for r in mine):g}"
                for name in mine[0]["cpu_us_per_msg"]
            )
            lines.append(
                f"| {key} | {config} | {rate} | {spread} | {delivered:g} % | {latency} | {cpu} |"
            )
    return "\n".join(lines)


def main_cost(args: argparse.Namespace) -> int:
    from securemsg.tls.devcerts import make_dev_pki

    with contextlib.ExitStack() as stack:
        if args.keep:
            directory = Path(tempfile.mkdtemp(prefix="securemsg-cluster-cost-"))
            print(f"logs in {directory}", file=sys.stderr)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="securemsg-cost-"))
            directory = Path(tmp)
        pki = make_dev_pki(directory / "pki", hosts=("localhost", "127.0.0.1"))
        chosen = [s for s in scenarios(args.quick) if not args.only or s.key in args.only]
        configs = [c for c in CONFIGS if not args.config or c in args.config]
        runs = []
        for round_ in range(args.rounds):
            order = configs if round_ % 2 == 0 else list(reversed(configs))
            for scenario in chosen:
                for config in order:
                    started = time.monotonic()
                    one = run_one(config, scenario, directory, pki, args)
                    one["seconds"] = round(time.monotonic() - started, 1)
                    print(json.dumps(one), file=sys.stderr, flush=True)
                    runs.append(one)
    if args.json:
        print(json.dumps(runs))
    else:
        print(report(runs, [s.key for s in chosen]))
    return 0 if all(r["ok"] for r in runs) else 1


async def worker_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(HERE))
    from compare import NatsSystem  # bench/compare.py's driver of nats-py

    from securemsg.bench.worker import run_worker

    port = args.pub_port if args.role == "pub" else args.sub_port
    return await run_worker(NatsSystem(port, args.ca), args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tenth of the counts")
    parser.add_argument("--only", action="append", help="this scenario only (repeatable)")
    parser.add_argument("--config", action="append", choices=CONFIGS, help="this system only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--node-option",
        action="append",
        metavar="ARG",
        help="one more argument of every securemsg server, single or node (repeatable: "
        "--node-option=--max-pending --node-option=50000)",
    )
    parser.add_argument(
        "--node-path", help="run the nodes from this source tree (PYTHONPATH), clients from here"
    )
    worker = commands.add_parser("worker", help="one process of the NATS cluster run")
    worker.add_argument("--pub-port", type=int, required=True)
    worker.add_argument("--sub-port", type=int, required=True)
    worker.add_argument("--ca", required=True)
    from securemsg.bench.worker import add_role_arguments

    add_role_arguments(worker)
    args = parser.parse_args(argv)
    if args.command == "worker":
        # nats-py on asyncio's loop, as bench/compare.py runs it (it stalls on uvloop).
        return asyncio.run(worker_main(args))
    return main_cost(args)


if __name__ == "__main__":
    sys.exit(main())
