"""The cluster chaos run of issue 14: python bench/cluster_chaos.py [--messages 20000] [--json]

A nats-server (JetStream on) and ``--nodes`` securemsg nodes (``securemsg server --cluster``,
subprocesses on fixed ports of 127.0.0.1), all on one fresh development PKI. ``--publishers``
publishers send ``--messages`` numbered messages in all, paced at ``--rate`` messages/s, to
one room held by ``--subscribers`` subscribers; every client is an ordinary asyncio client
in this process, given every node's address starting from its own (clients are spread over
the nodes in turn). Meanwhile a random node is killed with SIGKILL, left down ``--down``
seconds and started again on its port, ``--kills`` times, evenly over the stream. Its
clients move to another node (the next address) and resume their sessions there.

Then every publisher flushes (every message acknowledged), and each subscriber is checked
per publisher:

- lost: acknowledged to its publisher, never received;
- duplicated: received more than once;
- out of order: received after a higher number of the same publisher;
- longest pause: the longest time between two deliveries while it still missed messages
  (what a user of that subscriber saw of the failovers);

with how often it reconnected and how often that did not resume its session (a gap).
Bounded: the stream by ``--timeout``, each node start by 20 s, the wait for the last
deliveries by ``--idle-timeout`` after the last one. Exit status 1 when anything was lost,
duplicated or out of order. ``--json`` prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

import securemsg
from securemsg.bench.cluster import NatsServer, NodeProcess, node_env
from securemsg.bench.scenarios import Tally, make_payload
from securemsg.client.client import Client, Reconnected

ROOM = "chaos"
SIZE = 128
#: The body is a JSON string: two quotes around the payload.
CHARS = SIZE - 2


@dataclass
class Subscriber:
    name: str
    home: str
    client: Client
    tally: Tally
    expected: int
    longest_pause: float = 0.0
    last_at: float = 0.0
    reconnects: int = 0
    not_resumed: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        tally = self.tally
        return {
            "home": self.home,
            "ended_on": self.client.address,
            "received": tally.received,
            "lost": self.expected - tally.received,
            "duplicated": tally.duplicated,
            "out_of_order": tally.out_of_order,
            "errors": tally.errors,
            "longest_pause_s": round(self.longest_pause, 3),
            "reconnects": self.reconnects,
            "not_resumed": self.not_resumed,
        }


def ring(addresses: list[str], home: int) -> list[str]:
    """Every address, starting from the client's own."""
    home %= len(addresses)
    return addresses[home:] + addresses[:home]


async def open_client(addresses: list[str], home: int, name: str, ca: str) -> Client:
    return await securemsg.connect(
        ring(addresses, home),
        ca=ca,
        name=name,
        retry=True,
        reconnect_base=0.1,
        reconnect_cap=1.0,
        connect_timeout=5.0,
    )


async def receive(sub: Subscriber, start: asyncio.Event) -> None:
    """Count every delivery; note the longest silence while messages were still missing."""
    tally, client = sub.tally, sub.client
    async for message in client:
        now = time.monotonic()
        if start.is_set() and sub.last_at:
            sub.longest_pause = max(sub.longest_pause, now - sub.last_at)
        sub.last_at = now
        tally.add(message.body)
        if tally.received >= sub.expected:
            sub.done.set()


async def watch(sub: Subscriber) -> None:
    async for change in sub.client.state_changes():
        if isinstance(change, Reconnected):
            sub.reconnects += 1
            sub.not_resumed += not change.resumed


async def publish(
    client: Client, index: int, count: int, rate: float, deadline: float
) -> dict[str, Any]:
    """``count`` numbered messages at ``rate`` per second, then a flush: all acknowledged."""
    pad = "x" * CHARS
    start = time.monotonic()
    error = ""
    try:
        for seq in range(count):
            lag = start + seq / rate - time.monotonic()
            if lag > 0:
                await asyncio.sleep(lag)
            await client.publish(ROOM, make_payload(index, seq, CHARS, pad))
        await client.flush(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as exc:  # reported, not raised: the figures say what happened
        error = f"{type(exc).__name__}: {exc}"
    return {"sent": count, "seconds": round(time.monotonic() - start, 3), "error": error}


async def chaos(
    nodes: list[NodeProcess], *, kills: int, interval: float, down: float, rng: random.Random
) -> list[dict[str, Any]]:
    """Kill a random node every ``interval`` seconds from now (or as soon as the previous
    one is back), restart it ``down`` seconds later."""
    events: list[dict[str, Any]] = []
    began = time.monotonic()
    for index in range(kills):
        await asyncio.sleep(max(0.0, began + (index + 1) * interval - time.monotonic()))
        node = rng.choice(nodes)
        killed_at = time.monotonic()
        await asyncio.to_thread(node.kill)
        await asyncio.sleep(down)
        started = time.monotonic()
        await asyncio.to_thread(node.start)
        events.append(
            {
                "node": node.name,
                "at_s": round(killed_at - began, 3),
                "down_s": round(time.monotonic() - killed_at, 3),
                "restart_s": round(time.monotonic() - started, 3),
            }
        )
    return events


async def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    from securemsg.tls.devcerts import make_dev_pki

    pki = make_dev_pki(directory / "pki", hosts=("localhost", "127.0.0.1"))
    ca = str(pki.ca)
    nats = NatsServer(directory)
    nodes = [
        NodeProcess(
            directory,
            name=f"node{i}",
            cluster=None if args.no_cluster else nats.url,
            cert=str(pki.server_cert),
            key=str(pki.server_key),
            ca=ca,
            options=["--session-ttl", "600", "--log-level", "warning"],
            env=node_env(args.node_path),
        )
        for i in range(args.nodes)
    ]
    clients: list[Client] = []
    subs: list[Subscriber] = []
    try:
        await asyncio.to_thread(nats.start)
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
        addresses = [node.address for node in nodes]
        shares = [
            args.messages // args.publishers + (i < args.messages % args.publishers)
            for i in range(args.publishers)
        ]
        start = asyncio.Event()
        for i in range(args.subscribers):
            client = await open_client(addresses, i, f"sub{i}", ca)
            clients.append(client)
            await client.join(ROOM, timeout=10)
            tally = Tally(len(shares), max(shares))
            home = addresses[i % len(addresses)]
            sub = Subscriber(f"sub{i}", home, client, tally, args.messages)
            sub.tasks = [asyncio.create_task(receive(sub, start)), asyncio.create_task(watch(sub))]
            subs.append(sub)
        pubs = []
        for i in range(args.publishers):
            # Publishers start at the node after the subscribers' first, so messages cross.
            pubs.append(await open_client(addresses, i + 1, f"pub{i}", ca))
        clients += pubs
        stream = args.messages / args.rate
        deadline = time.monotonic() + args.timeout
        start.set()
        began = time.monotonic()
        rng = random.Random(args.seed)
        chaos_task = asyncio.create_task(
            chaos(
                nodes, kills=args.kills, interval=stream / (args.kills + 1), down=args.down, rng=rng
            )
        )
        published = await asyncio.gather(
            *(
                publish(pub, i, shares[i], args.rate / args.publishers, deadline)
                for i, pub in enumerate(pubs)
            )
        )
        publish_seconds = time.monotonic() - began  # every message sent and acknowledged
        kills = await chaos_task
        await wait_delivered(subs, idle=args.idle_timeout, deadline=deadline)
        return {
            "messages": args.messages,
            "publishers": args.publishers,
            "subscribers": args.subscribers,
            "nodes": args.nodes,
            "rate": args.rate,
            "kills": len(kills),
            "kill_events": kills,
            "publish_seconds": round(publish_seconds, 3),
            "publisher_results": published,
            "subscriber_figures": {sub.name: sub.figures() for sub in subs},
        }
    finally:
        for sub in subs:
            for task in sub.tasks:
                task.cancel()
        await asyncio.gather(*(c.close(timeout=2) for c in clients), return_exceptions=True)
        for node in nodes:
            await asyncio.to_thread(node.stop)
        await asyncio.to_thread(nats.stop)


async def wait_delivered(subs: list[Subscriber], *, idle: float, deadline: float) -> None:
    """Until every subscriber has everything, or nothing arrived for ``idle`` seconds, or
    the deadline."""
    while time.monotonic() < deadline:
        if all(sub.done.is_set() for sub in subs):
            return
        last = max((sub.last_at for sub in subs), default=0.0)
        if last and time.monotonic() - last > idle:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await asyncio.gather(*(sub.done.wait() for sub in subs))


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['messages']:,} messages from {result['publishers']} publishers to "
        f"{result['subscribers']} subscribers over {result['nodes']} nodes, "
        f"{result['kills']} node kills (SIGKILL, restart), published and acknowledged in "
        f"{result['publish_seconds']} s at {result['rate']:g}/s"
    )
    for index, publisher in enumerate(result["publisher_results"]):
        if publisher["error"]:
            print(f"publisher {index}: {publisher['error']}")
    print(
        "| subscriber | home | received | lost | duplicated | out of order | longest pause (s) "
        "| reconnects | not resumed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in result["subscriber_figures"].items():
        print(
            f"| {name} | {f['home']} | {f['received']:,} | {f['lost']} | {f['duplicated']} | "
            f"{f['out_of_order']} | {f['longest_pause_s']} | {f['reconnects']} | "
            f"{f['not_resumed']} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="in all (default 20000)")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--subscribers", type=int, default=6)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s in all")
    parser.add_argument("--kills", type=int, default=10, help="node kills and restarts")
    parser.add_argument("--down", type=float, default=1.0, help="seconds a killed node stays down")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the run")
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--no-cluster",
        action="store_true",
        help="plain single servers (checks the instrument; with --nodes 1 and no kills only)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--node-path", help="run the nodes from this source tree (PYTHONPATH), clients from here"
    )
    args = parser.parse_args()
    if min(args.messages, args.publishers, args.subscribers, args.nodes) < 1 or args.rate <= 0:
        parser.error("--messages, --publishers, --subscribers, --nodes and --rate must be > 0")
    structlog.configure(  # the library's warnings on stderr, not mixed into the figures
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(40),
    )
    directory = Path(tempfile.mkdtemp(prefix="securemsg-cluster-chaos-"))
    try:
        result = asyncio.run(run(args, directory))
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
    if args.keep:
        result["directory"] = str(directory)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    bad = any(
        f["lost"] or f["duplicated"] or f["out_of_order"] or f["errors"]
        for f in result["subscriber_figures"].values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
