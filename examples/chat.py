"""A minimal two-way chat with the asyncio client.

Start the development server (``securemsg server --dev``), then in two terminals::

    python examples/chat.py --name alice
    python examples/chat.py --name bob

Every line you type is published to the room; what the others write is printed as it
arrives. It ends at end of input (Ctrl-D) or after ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading

import securemsg
from securemsg import connect
from securemsg.log import configure_logging


def read_stdin(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """On a thread: hand each stdin line to the event loop, then None at the end."""
    with contextlib.suppress(RuntimeError):  # the loop closed first: nothing left to do
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)


async def chat(args: argparse.Namespace) -> None:
    async with connect(args.host, args.port, ca=args.ca, name=args.name) as client:
        await client.join(args.room)
        print(f"joined {args.room} as {client.name}; type a line, Ctrl-D to quit", flush=True)

        async def show_messages() -> None:
            async for message in client:
                print(f"{message.sender}: {message.body}", flush=True)

        lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=read_stdin, args=(loop, lines), daemon=True).start()
        printer = asyncio.create_task(show_messages())
        try:
            async with asyncio.timeout(args.duration):
                while (line := await lines.get()) is not None:
                    if line:
                        await client.publish(args.room, line)
        except TimeoutError:
            print(f"{args.duration:g} s are up", flush=True)
        finally:
            printer.cancel()
    # Leaving the block flushed what we sent (bounded) and said goodbye to the server.


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=7443)
    parser.add_argument("--ca", default="certs/ca.pem", help="CA file (default: %(default)s)")
    parser.add_argument("--name", default=f"chat-{os.getpid()}")
    parser.add_argument("--room", default="lobby")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds before exiting")
    args = parser.parse_args()
    configure_logging(level="warning")  # structlog to stderr; by default it prints to stdout
    try:
        asyncio.run(chat(args))
    except securemsg.SecureMsgError as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
