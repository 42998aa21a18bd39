"""Room matching at scale, without sockets: python bench/rooms_scale.py [--rooms N]

The three figures of issue 11 (items 2 and 3) on ``RoomRegistry`` alone:

- joins: 8,000 wildcard then 8,000 concrete joins by distinct members, each followed by the
  lookup the broker makes to announce presence (``members`` of the filter), as a server does;
- publishes: 2,000 publishes to distinct rooms (every one a cache miss) while one member
  holds 20,000 wildcard filters;
- memory: tracemalloc's traced bytes after publishing once to each of ``--rooms`` distinct
  rooms (default 1,500,000) that nobody joined, next to an empty registry's.

Every loop is bounded by its count; run it on an idle machine and compare runs side by side.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from securemsg.core.rooms import RoomRegistry


def joins(wild: int, concrete: int) -> float:
    rooms: RoomRegistry[int] = RoomRegistry()
    start = time.perf_counter()
    for i in range(wild):
        room_filter = f"sensors.s{i}.*"
        rooms.join(i, room_filter)
        rooms.members(room_filter)
    for i in range(concrete):
        room_filter = f"sensors.s{i}.temp"
        rooms.join(wild + i, room_filter)
        rooms.members(room_filter)
    return time.perf_counter() - start


def publishes(filters: int, count: int) -> float:
    rooms: RoomRegistry[int] = RoomRegistry()
    for i in range(filters):
        rooms.join(0, f"feed{i}.*.>")
    rooms.join(1, "chat.>")
    start = time.perf_counter()
    for i in range(count):
        rooms.match(f"chat.r{i}")
    return time.perf_counter() - start


def memory(count: int) -> int:
    rooms: RoomRegistry[int] = RoomRegistry()
    rooms.join(1, "chat.lobby")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        rooms.match(f"chat.room{i}")
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=1_500_000)
    parser.add_argument("--wild", type=int, default=8_000)
    parser.add_argument("--concrete", type=int, default=8_000)
    args = parser.parse_args()
    took = joins(args.wild, args.concrete)
    print(f"{args.wild:,} wildcard + {args.concrete:,} concrete joins: {took * 1000:,.1f} ms")
    took = publishes(20_000, 2_000)
    print(f"2,000 publishes, one member holding 20,000 wildcard filters: {took * 1000:,.1f} ms")
    grown = memory(args.rooms)
    print(f"memory after publishing to {args.rooms:,} distinct rooms: +{grown / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
