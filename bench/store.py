"""Committed messages per second of the SQLite session store: python bench/store.py

For each ``store_sync`` (normal, full), batch size (messages handed over in one loop
iteration: 1, 64, 1024) and fan-out (recipients per message: 1, 20), a fresh store in a
temporary directory takes messages of a typical encoded size, each round also acking the
previous round for every recipient (the steady state of a server whose subscribers keep
up), and waits for the commit before the next round, as the server waits before it
acknowledges a publish. Bounded: each case stops after ``--msgs`` messages or
``--seconds``, whichever comes first. Prints a Markdown table (``--json`` for JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from securemsg.server.store import SqliteStore, StoreSync

#: A 128-byte body encoded as a ``message`` frame prefix is about this long.
PREFIX = b'{"type":"message","room":"bench","sender":"pub","body":"' + b"x" * 128 + b'","seq":'


async def measure(
    sync: StoreSync, *, batch: int, fanout: int, msgs: int, seconds: float
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore(str(Path(directory) / "bench.db"), sync=sync)
        await store.open()
        sids = [f"s{n}" for n in range(fanout)]
        for sid in sids:
            store.session_created(sid, name=sid, token=sid)
        await store.wait_committed()
        seq = sent = 0
        started = time.perf_counter()
        deadline = started + seconds
        while sent < msgs and time.perf_counter() < deadline:
            acked = seq
            for _ in range(batch):
                seq += 1
                store.message_accepted(PREFIX, [(sid, seq) for sid in sids])
            for sid in sids:
                store.acked(sid, acked)
            await store.wait_committed()
            sent += batch
        elapsed = time.perf_counter() - started
        await store.close()
    return {
        "sync": sync,
        "batch": batch,
        "fanout": fanout,
        "messages": sent,
        "msgs_per_s": round(sent / elapsed),
        "refs_per_s": round(sent * fanout / elapsed),
        "us_per_commit": round(elapsed / (sent / batch) * 1e6),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--msgs", type=int, default=50_000, help="messages per case, at most")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per case, at most")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    syncs: tuple[StoreSync, ...] = ("normal", "full")
    rows = [
        await measure(sync, batch=batch, fanout=fanout, msgs=args.msgs, seconds=args.seconds)
        for sync in syncs
        for fanout in (1, 20)
        for batch in (1, 64, 1024)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| store_sync | fan-out | batch | committed msgs/s | refs/s | µs a commit |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['sync']} | 1→{row['fanout']} | {row['batch']} | {row['msgs_per_s']:,} |"
            f" {row['refs_per_s']:,} | {row['us_per_commit']:,} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
