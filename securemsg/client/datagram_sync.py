"""The blocking datagram client: :class:`~securemsg.client.datagram.DatagramClient`
without ``await``, on its own event loop thread (as :mod:`securemsg.client.sync`)::

    with securemsg.datagram.connect_sync("localhost", ca="ca.pem", name="probe-7") as probe:
        probe.publish("sensors.kitchen.temp", {"c": 21.5})
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any, Final

from securemsg.client import datagram as aio
from securemsg.client.sync import _LoopThread
from securemsg.client.types import Message
from securemsg.errors import ClosedError

__all__ = ["SyncDatagramClient", "connect_sync"]

_CLOSE_TIMEOUT: Final = 2.0


def connect_sync(
    host: str,
    port: int = 7443,
    *,
    ca: str | None = None,
    name: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
) -> SyncDatagramClient:
    """:func:`securemsg.datagram.connect`, blocking."""
    thread = _LoopThread()
    try:
        client = thread.run(
            aio.connect(
                host, port, ca=ca, name=name, cert=cert, key=key, token=token, timeout=timeout
            ),
            timeout,
        )
    except BaseException:
        thread.stop(_CLOSE_TIMEOUT)
        raise
    return SyncDatagramClient(client, thread)


class SyncDatagramClient:
    def __init__(self, client: aio.DatagramClient, thread: _LoopThread) -> None:
        self._client = client
        self._thread = thread
        self.name = client.name
        self.handshake_time = client.handshake_time

    def publish(self, room: str, body: Any, *, id: str | None = None) -> None:
        self._thread.run(self._client.publish(room, body, id=id), None)

    def join(self, room: str, *, timeout: float = 5.0) -> None:
        self._thread.run(self._client.join(room, timeout=timeout), timeout)

    def leave(self, room: str, *, timeout: float = 5.0) -> None:
        self._thread.run(self._client.leave(room, timeout=timeout), timeout)

    def ping(self, *, timeout: float = 5.0) -> float:
        return self._thread.run(self._client.ping(timeout=timeout), timeout)

    def receive(self, timeout: float | None = None) -> Message:
        return self._thread.run(self._client.receive(timeout), timeout)

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.receive()
            except ClosedError:
                return

    @property
    def dropped(self) -> int:
        return self._client.dropped

    def close(self) -> None:
        try:
            self._thread.run(self._client.close(), _CLOSE_TIMEOUT)
        except ClosedError:
            pass
        finally:
            self._thread.stop(_CLOSE_TIMEOUT)

    def __enter__(self) -> SyncDatagramClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
