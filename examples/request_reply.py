"""Request and reply: a service that adds numbers, and a caller that asks it with
``client.request``.

A request is a publish to a room carrying a fresh ``reply_to``; the service answers with
``client.reply(message, body)``, a direct to the caller that the caller's ``request`` call
returns. Start the development server (``securemsg server --dev``), then::

    python examples/request_reply.py             # a service and a caller in one process
    python examples/request_reply.py service     # or: a service, for --duration seconds
    python examples/request_reply.py caller      # and, elsewhere, a caller making --count requests
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import securemsg
from securemsg import connect
from securemsg.log import configure_logging


async def service(args: argparse.Namespace, ready: asyncio.Event | None = None) -> None:
    """Answer ``{"a": x, "b": y}`` with ``{"sum": x + y}`` until cancelled or --duration."""
    async with connect(args.host, args.port, ca=args.ca, name=f"adder-{os.getpid()}") as client:
        await client.join(args.room)  # requests are published to the room's members
        print(f"service {client.name} answering requests in {args.room}", flush=True)
        if ready is not None:
            ready.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration):
                async for request in client:
                    if request.reply_to is None:
                        continue  # an ordinary message, not a request
                    try:
                        answer = {"sum": request.body["a"] + request.body["b"]}
                    except (KeyError, TypeError):
                        answer = {"error": 'expected {"a": number, "b": number}'}
                    await client.reply(request, answer)


async def caller(args: argparse.Namespace) -> None:
    """Make --count requests, one after the other, and print each answer."""
    async with connect(args.host, args.port, ca=args.ca, name=f"caller-{os.getpid()}") as client:
        for n in range(1, args.count + 1):
            reply = await client.request(args.room, {"a": n, "b": n * n}, timeout=args.timeout)
            print(f"{n} + {n * n} = {reply.body['sum']} (answered by {reply.sender})", flush=True)


async def both(args: argparse.Namespace) -> None:
    ready = asyncio.Event()
    server = asyncio.create_task(service(args, ready))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([server, waiting], return_when=asyncio.FIRST_COMPLETED)
    if server.done():  # the service failed to start: report why
        waiting.cancel()
        server.result()
    try:
        await caller(args)
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", choices=("both", "service", "caller"), default="both")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=7443)
    parser.add_argument("--ca", default="certs/ca.pem", help="CA file (default: %(default)s)")
    parser.add_argument("--room", default="adder")
    parser.add_argument("--count", type=int, default=5, help="requests the caller makes")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait per reply")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds the service runs")
    args = parser.parse_args()
    configure_logging(level="warning")  # structlog to stderr; by default it prints to stdout
    run = {"both": both, "service": service, "caller": caller}[args.role]
    try:
        asyncio.run(run(args))
    except securemsg.TimeoutError:
        print("request_reply: nobody answered in time; is the service running?", file=sys.stderr)
        return 1
    except securemsg.SecureMsgError as exc:
        print(f"request_reply: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
