"""Impaired links for ``securemsg bench datagram``: a UDP proxy that drops, reorders and
delays datagrams, and a TCP proxy with the same delay whose lost segments cost what TCP's
recovery costs.

The UDP proxy is exact: each datagram, in each direction, is dropped with probability
``loss``, held back (delivered after the ones that follow it) with probability ``reorder``,
and otherwise delayed by ``delay`` seconds.

The TCP proxy is a model, since the bytes inside a TCP connection cannot be lost (and
impairing the kernel's loopback with netem would reach every process on the machine): each
chunk read is "lost" with probability ``loss`` and then delivered when Linux's TCP would
have resent it, whichever comes first of fast retransmit (three segments later: their
duplicate acks travel back and the resend forth, a round trip) and the tail-loss probe (two
round trips, at least :data:`TLP_MINIMUM`, then the resend). Every chunk behind a lost one
waits for it, as TCP's in-order delivery makes it (head-of-line blocking). The model is
kind to TCP: it never needs the 200 ms retransmission timeout, a resend is never lost
again, and congestion control does not slow the sender. Reordering costs TCP nothing
visible and is not modelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["TLP_MINIMUM", "Impairment", "TcpProxy", "UdpProxy"]

#: The shortest tail-loss probe timeout (Linux: two smoothed round trips, at least 10 ms).
TLP_MINIMUM: Final = 0.01
_CHUNK: Final = 65536


@dataclass(frozen=True, slots=True)
class Impairment:
    loss: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0  # one way, seconds
    seed: int = 17

    def __post_init__(self) -> None:
        if not (0 <= self.loss < 1 and 0 <= self.reorder < 1 and self.loss + self.reorder < 1):
            raise ValueError("loss and reorder are fractions whose sum is below 1")
        if self.delay < 0:
            raise ValueError("delay is a number of seconds, 0 or more")


class _Front(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.proxy._from_client(data, addr)


class _Back(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpProxy, client: Any) -> None:
        self.proxy, self.client = proxy, client
        self.transport: asyncio.DatagramTransport | None = None
        self.backlog: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        front = self.proxy._front
        if front is not None:
            self.proxy._impaired(lambda: front.sendto(data, self.client))


class UdpProxy:
    """Listens on ``host``:``port`` (``port`` once started) and relays to ``target``, one
    upstream socket per client address, impairing both directions."""

    def __init__(self, target: tuple[str, int], impairment: Impairment, *, host: str) -> None:
        self.target, self.impairment, self.host = target, impairment, host
        self.port = 0
        self.dropped = self.reordered = self.relayed = 0
        self._random = random.Random(impairment.seed)
        self._front: asyncio.DatagramTransport | None = None
        self._backs: dict[Any, _Back] = {}
        self._handles: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> UdpProxy:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(self.host, 0)
        )
        self.port = self._front.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.cancel()
        for task in self._tasks:
            task.cancel()
        for back in self._backs.values():
            if back.transport is not None:
                back.transport.close()
        if self._front is not None:
            self._front.close()

    def _from_client(self, data: bytes, client: Any) -> None:
        back = self._backs.get(client)
        if back is None:
            back = self._backs[client] = _Back(self, client)
            task = asyncio.get_running_loop().create_task(self._connect(back))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if back.transport is None:
            back.backlog.append(data)
            return
        transport = back.transport
        self._impaired(lambda: transport.sendto(data))

    async def _connect(self, back: _Back) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: back, remote_addr=self.target)
        back.transport = transport
        for data in back.backlog:
            self._impaired(lambda data=data: transport.sendto(data))
        back.backlog.clear()

    def _impaired(self, send: Any) -> None:
        impairment = self.impairment
        draw = self._random.random()
        if draw < impairment.loss:
            self.dropped += 1
            return
        self.relayed += 1
        delay = impairment.delay
        if draw < impairment.loss + impairment.reorder:
            self.reordered += 1
            delay += max(2 * impairment.delay, 0.002)  # lands after the ones that follow
        if delay <= 0:
            send()
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._handles.discard(handle)
            send()

        handle = loop.call_later(delay, fire)
        self._handles.add(handle)


class TcpProxy:
    """Listens on ``host``:``port`` and relays each connection to ``target`` with the same
    one-way ``delay``; a chunk lost with probability ``loss`` is held for a retransmission
    (see the module doc) and holds the chunks behind it."""

    def __init__(self, target: tuple[str, int], impairment: Impairment, *, host: str) -> None:
        self.target, self.impairment, self.host = target, impairment, host
        self.port = 0
        self.retransmitted = 0
        self._random = random.Random(impairment.seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accepted, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        line: deque[list[Any]] = deque()  # [release time, data], in order
        changed = asyncio.Event()
        writer = loop.create_task(self._release(line, changed, sink))
        delay = self.impairment.delay
        lost: list[list[Any]] = []  # [entry, segments still to follow before fast retransmit]
        try:
            while data := await source.read(_CHUNK):
                now = loop.time()
                entry = [now + delay, data]
                for waiting in lost:  # each later segment is a duplicate ack for the lost one
                    waiting[1] -= 1
                    if waiting[1] == 0:  # fast retransmit: dupacks back, the resend forth
                        waiting[0][0] = min(waiting[0][0], now + 3 * delay)
                lost = [waiting for waiting in lost if waiting[1] > 0]
                if self._random.random() < self.impairment.loss:
                    self.retransmitted += 1
                    # The tail-loss probe: two round trips (at least 10 ms), then the resend.
                    entry[0] = now + max(4 * delay, TLP_MINIMUM) + delay
                    lost.append([entry, 3])
                line.append(entry)
                changed.set()
            line.append([loop.time() + delay, b""])
            changed.set()
            await writer
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await writer
            sink.close()

    async def _release(
        self, line: deque[list[Any]], changed: asyncio.Event, sink: asyncio.StreamWriter
    ) -> None:
        """Write the chunks in order, each at its release time: one held back for a
        retransmission holds every chunk behind it (in-order delivery)."""
        loop = asyncio.get_running_loop()
        while True:
            if not line:
                changed.clear()
                await changed.wait()
                continue
            release, data = line[0]
            wait = release - loop.time()
            if wait > 0:
                changed.clear()  # a fast retransmit may bring the release forward
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait)
                continue
            line.popleft()
            if not data:
                return
            sink.write(data)
