"""A worker of an unpaced run whose publisher misbehaves on purpose (run as a script by
``test_bench_smoke.py``): it never publishes message 3, publishes message 5 twice and
message 8 after message 9, so the subscribers must count one lost, one duplicated and one
out-of-order message per subscription."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from securemsg.bench.scenarios import parse_payload
from securemsg.bench.system import SecureMsgSystem
from securemsg.bench.worker import add_role_arguments, run_worker
from securemsg.runner import run


class FaultyPublisher:
    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint
        self._held: str | None = None

    async def publish(self, room: str, payload: str) -> None:
        seq = parse_payload(payload)[1]
        if seq == 3:
            return
        if seq == 8:
            self._held = payload
            return
        await self._endpoint.publish(room, payload)
        if seq == 5:
            await self._endpoint.publish(room, payload)
        if seq == 9 and self._held is not None:
            await self._endpoint.publish(room, self._held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._endpoint, name)


class FaultySystem(SecureMsgSystem):
    async def connect(self, name: str) -> Any:
        return FaultyPublisher(await super().connect(name))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    add_role_arguments(parser)
    args = parser.parse_args()

    async def work() -> int:
        kind = FaultySystem if args.role == "pub" else SecureMsgSystem
        return await run_worker(kind(args.host, args.port, ca=args.ca), args)

    return run(work())


if __name__ == "__main__":
    sys.exit(main())
