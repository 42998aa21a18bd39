"""A telemetry publisher with the blocking client, ``securemsg.sync``: no asyncio here.

It publishes ``--count`` numbered readings as fast as the outbox takes them (each
``publish`` returns once the reading is queued, so thousands travel per round trip), then
``flush`` waits until the server has acknowledged every one. Start the development server
(``securemsg server --dev``), watch the readings arrive with::

    securemsg listen --ca certs/ca.pem --room 'telemetry.>'

and run::

    python examples/telemetry.py --count 10000
    python examples/telemetry.py --count 20 --interval 0.5     # one reading every 0.5 s
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import securemsg
import securemsg.sync
from securemsg.log import configure_logging


def publish_readings(args: argparse.Namespace) -> None:
    room = f"telemetry.{args.sensor}"
    with securemsg.sync.connect(
        args.host, args.port, ca=args.ca, name=f"{args.sensor}-{os.getpid()}"
    ) as client:
        started = time.perf_counter()
        for n in range(1, args.count + 1):
            value = round(20.0 + 2.0 * math.sin(n / 10), 3)  # a plausible temperature
            client.publish(room, {"n": n, "sensor": args.sensor, "celsius": value})
            if args.interval:
                time.sleep(args.interval)
        queued = time.perf_counter() - started
        client.flush(timeout=30.0)  # every reading acknowledged, or securemsg.TimeoutError
        elapsed = time.perf_counter() - started
    rate = args.count / elapsed if elapsed else float("inf")
    print(
        f"published {args.count} readings to {room}: queued in {queued:.3f} s, all acknowledged"
        f" after {elapsed:.3f} s ({rate:,.0f} readings/s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=7443)
    parser.add_argument("--ca", default="certs/ca.pem", help="CA file (default: %(default)s)")
    parser.add_argument(
        "--sensor", default="sensor-1", help="sensor name; the room is telemetry.SENSOR"
    )
    parser.add_argument("--count", type=int, default=1000, help="readings to publish")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between readings")
    args = parser.parse_args()
    configure_logging(level="warning")  # structlog to stderr; by default it prints to stdout
    try:
        publish_readings(args)
    except securemsg.SecureMsgError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
