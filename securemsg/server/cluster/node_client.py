"""nats-py's client with a short way out for a node's hot path, and the stream handler's
adapter (:func:`callback`).

The stream comes in nats-py's way: a :class:`~nats.aio.msg.Msg` each, a queue and the
subscription's task, whose awaits are what lets flow control work (the clients' acks are read
and a congestion note leaves before the node reads on: :data:`Pause`). A short way in, from
nats-py's protocol parser straight to the handler, saved ~4 µs of a node's CPU per message
but read a backlog without a yield: an unpaced cross-node fan-out then lost 5-23 % in 2
rounds of 8 (0 of 7 without it), so it was taken out.

Out, :meth:`NodeClient.publish_all` writes the publishes the node queued in one loop turn as
protocol commands joined into one buffer for nats-py's writer, where nats-py's ``publish``
checks, encodes and queues each one (its header dict included); what needs nats-py's checks
(a payload past the server's limit, a header that is not one plain ``Nats-Msg-Id``) goes
its way, in order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from securemsg.core.cluster import (
    MSG_ID_HEADER,
    stream_pending,
    stream_position,
)

__all__ = ["NodeClient", "Outgoing", "StreamHandler"]

logger = structlog.get_logger("securemsg.server.cluster")

#: (stream seq, subject, payload, Nats-Msg-Id or None, messages the stream still holds for
#: the consumer): one stream message, in order. True asks that the next ones wait for a
#: :data:`Pause` (flow control: the clients' acks must be read, a congestion note must
#: leave, before the node reads on).
StreamHandler = Callable[[int, str, bytes, "str | None", int], bool]
Pause = Callable[[], Awaitable[None]]

#: One publish: (subject, payload, reply inbox or "", headers or None).
Outgoing = tuple[str, bytes, str, "dict[str, str] | None"]

#: What the short way out reads of nats-py's client.
_NEEDED = ("_pending", "_pending_data_size", "_flush_queue", "_flush_pending", "_max_payload")
_HEADER_START: Final = b"NATS/1.0\r\n" + MSG_ID_HEADER.encode() + b": "


class NodeClient(NATS):
    """nats-py's client with a short way out for the node's publishes (:meth:`publish_all`)."""

    def __init__(self) -> None:
        super().__init__()
        self._raw_out = all(hasattr(self, name) for name in _NEEDED) and isinstance(
            self._pending, list
        )

    async def publish_all(self, batch: list[Outgoing]) -> None:
        """Publish ``batch`` in order, with one flush (see the module doc)."""
        if not self._raw_out or not self.is_connected:
            for subject, payload, reply, headers in batch:
                await self.publish(subject, payload, reply=reply, headers=headers)
            return
        parts: list[bytes] = []
        limit = self._max_payload
        for subject, payload, reply, headers in batch:
            if headers is None and len(payload) <= limit:
                parts.append(f"PUB {subject} {reply} {len(payload)}\r\n".encode())
            elif (header := _plain_header(headers)) is not None and len(payload) <= limit:
                size = len(header) + len(payload)
                parts.append(f"HPUB {subject} {reply} {len(header)} {size}\r\n".encode())
                parts.append(header)
            else:  # nats-py refuses it or cleans its headers up: its way, in order
                self._queue_raw(parts)
                parts = []
                await self.publish(subject, payload, reply=reply, headers=headers)
                continue
            parts.append(payload)
            parts.append(b"\r\n")
        self._queue_raw(parts)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def _queue_raw(self, parts: list[bytes]) -> None:
        if parts:
            data = b"".join(parts)
            self._pending.append(data)
            self._pending_data_size += len(data)


def _plain_header(headers: dict[str, str] | None) -> bytes | None:
    """The encoded headers when they are one ``Nats-Msg-Id`` that nats-py would send as it
    is (printable ASCII, no surrounding space), else None."""
    if headers is None or len(headers) != 1:
        return None
    value = headers.get(MSG_ID_HEADER)
    if value is None or not (value.isascii() and value.isprintable()) or value != value.strip():
        return None
    return _HEADER_START + value.encode() + b"\r\n\r\n"


def callback(handler: StreamHandler, pause: Pause) -> Callable[[Msg], Any]:
    """nats-py's callback for the messages that take its path (see the module doc)."""

    async def on_message(msg: Msg) -> None:
        headers = msg.headers
        msg_id = headers.get(MSG_ID_HEADER) if headers else None
        reply = msg.reply
        if handler(stream_position(reply), msg.subject, msg.data, msg_id, stream_pending(reply)):
            await pause()

    return on_message
