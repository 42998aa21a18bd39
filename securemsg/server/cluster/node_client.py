"""nats-py's client with two short ways for a node's hot path: in, for the stream (every node
reads every stream message, so what nats-py does per message is paid by every node for every
message), and out, for the node's publishes.

nats-py hands a subscription's messages to its callback through a :class:`~nats.aio.msg.Msg`
each (its headers parsed into a dict), a queue and a task. For the node's ordered consumer,
:class:`NodeClient` takes the plain case out before that: a data message, in consumer order,
with nothing queued before it, goes straight from nats-py's protocol parser to the handler
(stream position, subject, payload, ``Nats-Msg-Id``). Everything else (heartbeats, flow
control, a gap that makes nats-py restart the consumer, what came before the short way was
set up) takes nats-py's own path, in order, and reaches the same handler from its callback.

The short way keeps the ordered consumer's bookkeeping as nats-py does (the consumer
sequence it expects next, the last stream sequence, the count flow control answers by, the
activity the heartbeat check looks for). It reads attributes nats-py does not publish
(checked once: without them the node takes nats-py's path for every message); the cluster
tests drive it over a real nats-server, consumer restarts and flow control included.

Out, :meth:`NodeClient.publish_all` writes the publishes the node queued in one loop turn as
protocol commands joined into one buffer for nats-py's writer, where nats-py's ``publish``
checks, encodes and queues each one (its header dict included); what needs nats-py's checks
(a payload past the server's limit, a header that is not one plain ``Nats-Msg-Id``) goes
its way, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from securemsg.core.cluster import (
    MSG_ID_HEADER,
    message_id_of,
    stream_pending,
    stream_position,
)

__all__ = ["NodeClient", "Outgoing", "StreamHandler"]

logger = structlog.get_logger("securemsg.server.cluster")

#: (stream position, subject, payload, Nats-Msg-Id or None): one stream message, in order.
#: (stream seq, subject, payload, Nats-Msg-Id, messages still pending for the consumer):
#: True asks for a yield to the loop before the next message, where the caller can.
StreamHandler = Callable[[int, str, bytes, "str | None", int], bool]

#: One publish: (subject, payload, reply inbox or "", headers or None).
Outgoing = tuple[str, bytes, str, "dict[str, str] | None"]

#: What the short ways read of nats-py's client, subscription and JetStream state.
_NEEDED = {
    "client": ("_pending", "_pending_data_size", "_flush_queue", "_flush_pending", "_max_payload"),
    "sub": ("_id", "_received", "_pending_queue", "_jsi"),
    "jsi": ("_dseq", "_sseq", "_active", "track_sequences"),
}
_HEADER_START: Final = b"NATS/1.0\r\n" + MSG_ID_HEADER.encode() + b": "


class _Follower:
    __slots__ = ("handler", "sub")

    def __init__(self, sub: Any, handler: StreamHandler) -> None:
        self.sub = sub
        self.handler = handler

    def take(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """Hand one message to the handler; False leaves it to nats-py."""
        sub = self.sub
        jsi = sub._jsi
        if not data or jsi is None or sub._pending_queue.qsize():
            return False  # a control message (no payload), or in order after queued ones
        if headers is not None and headers[8:9] == b" ":
            return False  # a status line ("NATS/1.0 100 ...")
        tokens = reply.split(b".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>,
        # the form nats-py's ordered consumer reads too.
        if len(tokens) != 9 or int(tokens[6]) != jsi._dseq:
            return False  # a gap: nats-py restarts the consumer after the last one read
        sseq = int(tokens[5])
        jsi._active = True
        jsi._dseq += 1
        jsi._sseq = sseq
        jsi.track_sequences(reply.decode())
        sub._received += 1
        try:
            # Its wish to yield waits for the end of this read: nats-py's parser goes on
            # with the rest of it without awaiting anything.
            self.handler(sseq, subject.decode(), data, message_id_of(headers), int(tokens[8]))
        except Exception as exc:  # as nats-py reports a callback's error: it reads on
            logger.warning("cluster_error", error=repr(exc), exc_info=exc)
        return True


class NodeClient(NATS):
    """nats-py's client with the short way in for one ordered consumer (:meth:`follow`)."""

    def __init__(self) -> None:
        super().__init__()
        self._follower: _Follower | None = None
        self._raw_out = all(hasattr(self, name) for name in _NEEDED["client"]) and isinstance(
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

    def follow(self, psub: Any, handler: StreamHandler) -> None:
        """Take the plain messages of ``psub`` (a push subscription of an ordered consumer,
        made with :func:`callback` of the same handler) the short way."""
        sub = getattr(psub, "_sub", None)
        jsi = getattr(sub, "_jsi", None)
        usable = all(hasattr(sub, name) for name in _NEEDED["sub"]) and all(
            hasattr(jsi, name) for name in _NEEDED["jsi"]
        )
        if not usable:
            logger.info("cluster_short_path_unavailable")
            self._follower = None
            return
        self._follower = _Follower(sub, handler)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        follower = self._follower
        if follower is not None and sid == follower.sub._id:
            if follower.take(subject, reply, data, headers):
                return
        await super()._process_msg(sid, subject, reply, data, headers)


def _plain_header(headers: dict[str, str] | None) -> bytes | None:
    """The encoded headers when they are one ``Nats-Msg-Id`` that nats-py would send as it
    is (printable ASCII, no surrounding space), else None."""
    if headers is None or len(headers) != 1:
        return None
    value = headers.get(MSG_ID_HEADER)
    if value is None or not (value.isascii() and value.isprintable()) or value != value.strip():
        return None
    return _HEADER_START + value.encode() + b"\r\n\r\n"


def callback(handler: StreamHandler) -> Callable[[Msg], Any]:
    """nats-py's callback for the messages that take its path (see the module doc)."""

    async def on_message(msg: Msg) -> None:
        headers = msg.headers
        msg_id = headers.get(MSG_ID_HEADER) if headers else None
        reply = msg.reply
        if handler(stream_position(reply), msg.subject, msg.data, msg_id, stream_pending(reply)):
            await asyncio.sleep(0)

    return on_message
