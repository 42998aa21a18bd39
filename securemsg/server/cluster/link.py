"""The node's NATS connection: the stream, the key-value buckets, publishing, reading back.

A thin layer: it knows NATS and JetStream and nothing of sessions; the rules are in
:mod:`securemsg.core.cluster` and :mod:`securemsg.server.cluster.broker`. Publishing is
synchronous for the caller (the broker runs inside a connection's read callback): messages
go to a queue that one task hands to nats-py, which batches the writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from nats.errors import AuthorizationError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from securemsg.core.cluster import (
    STREAM_SUBJECTS,
    SessionRecord,
    directs_subject,
    filter_subject,
    parse_subject,
    stream_position,
)
from securemsg.errors import ConfigError
from securemsg.runner import cancel_and_wait
from securemsg.server.cluster.node_client import (
    NodeClient,
    Outgoing,
    Pause,
    StreamHandler,
    callback,
)
from securemsg.tls.contexts import TLS12_CIPHERS, reason_text

__all__ = ["STREAM", "ClusterSettings", "NatsLink", "StreamMessage"]

logger = structlog.get_logger("securemsg.server.cluster")

STREAM: Final = "SECUREMSG"
#: Messages one replay reads at a time.
_REPLAY_BATCH: Final = 512
_PUBLISH_QUEUE: Final = 100_000

StreamMessage = tuple[int, str, bytes]


#: A first connect gives up after this many request timeouts (several rounds of the URLs).
_FIRST_CONNECT_ATTEMPTS: Final = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    servers: list[str]
    node: str
    #: Where clients reach this node (``welcome.nodes``).
    address: str
    credentials: str | None = None
    user: str | None = None
    password: str | None = None
    #: TLS to NATS: the CA of its servers, and this node's certificate for mutual TLS.
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    max_bytes: int = 1 << 30
    session_ttl: float = 60.0
    #: A node says it is alive this often, and is dead when not heard for node_timeout.
    beat_interval: float = 1.0
    node_timeout: float = 3.0
    #: A publish JetStream has not acknowledged in ack_timeout is sent again (same id),
    #: at most ack_attempts times, then refused.
    ack_timeout: float = 1.0
    ack_attempts: int = 3
    #: How long ``who`` waits for the other nodes' answers.
    who_timeout: float = 0.25
    #: How often acknowledgements move the sessions' checkpoints in the records.
    checkpoint_interval: float = 0.2
    #: Every request to NATS (a record, a replay) has this deadline.
    request_timeout: float = 2.0

    @property
    def max_age(self) -> float:
        """How long the stream keeps messages: a session may resume within session_ttl of
        its last checkpoint, which idle sessions refresh every session_ttl / 2."""
        return max(300.0, 4 * self.session_ttl)


def nats_tls_context(settings: ClusterSettings) -> ssl.SSLContext | None:
    """The context of TLS to NATS when a CA or certificate is set (else None: nats-py makes
    one trusting the system's CAs for tls:// URLs), with the TLS side's cipher policy;
    ConfigError in one sentence when a file cannot be used."""
    if settings.ca is None and settings.cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    setting, path = "cluster_ca", settings.ca
    try:
        if path is not None:
            context.load_verify_locations(cafile=path)
        setting, path = "cluster_cert", settings.cert
        if path is not None:
            context.load_cert_chain(path, settings.key, _no_password)
    except FileNotFoundError as exc:
        raise ConfigError(f"{setting} file {exc.filename or path} does not exist") from None
    except _EncryptedKey:
        raise ConfigError(
            f"cluster_key {settings.key or path} is encrypted; securemsg needs an unencrypted key"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{setting} file {path} cannot be used for TLS: {reason_text(exc)}"
        ) from None
    return context


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Never let OpenSSL prompt for a password on the terminal of a server.
    raise _EncryptedKey


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate is not trusted ({exc.verify_message}): check cluster_ca"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc}): check cluster_ca, cluster_cert and cluster_key"
    if isinstance(exc, AuthorizationError):
        return "it refused our credentials: check cluster_credentials or cluster_user"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return repr(exc)


class NatsLink:
    """One NATS connection with JetStream: the ``SECUREMSG`` stream and the buckets
    ``sm_sessions``, ``sm_names`` and ``sm_nodes``."""

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        on_lost: Callable[[], None],
        on_back: Callable[[], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self._on_lost = on_lost
        self._on_back = on_back
        self.nc: NodeClient | None = None
        #: The first connect's last failure, and the one no retry can mend, if any.
        self._last_error: Exception | None = None
        self._refused: asyncio.Future[Exception] | None = None
        self._js: JetStreamContext | None = None
        self.sessions: KeyValue | None = None
        self.names: KeyValue | None = None
        self.nodes: KeyValue | None = None
        self._queue: list[Outgoing] = []
        self._wake = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "the cluster link is not connected"
        return self._js

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        settings = self.settings
        options: dict[str, Any] = {
            "servers": settings.servers,
            "name": f"securemsg {settings.node}",
            "connect_timeout": settings.request_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "ping_interval": 2,
            "max_outstanding_pings": 2,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
            # Every subject is ours, made of validated names and rooms (core.cluster): nats-py
            # need not check each one again on every publish.
            "skip_subject_validation": True,
        }
        tls = nats_tls_context(settings)
        if tls is not None:
            options["tls"] = tls
        if settings.credentials is not None:
            options["user_credentials"] = settings.credentials
        if settings.user is not None:
            options["user"] = settings.user
            options["password"] = settings.password or ""
        where = ",".join(settings.servers)
        nc = NodeClient()
        refused = self._refused = asyncio.get_running_loop().create_future()
        connecting = asyncio.ensure_future(nc.connect(**options))
        try:
            # Bounded: with max_reconnect_attempts -1 nats-py retries a first connect forever
            # too, and a node that cannot reach NATS would hang at start. A refusal that no
            # retry can mend (a certificate, a password) ends the wait at once.
            async with asyncio.timeout(_FIRST_CONNECT_ATTEMPTS * settings.request_timeout):
                await asyncio.wait({connecting, refused}, return_when="FIRST_COMPLETED")
            if not connecting.done():
                raise refused.result()
            await connecting
            self.nc = nc
        except (OSError, NatsError, TimeoutError) as exc:
            connecting.cancel()
            with contextlib.suppress(Exception):
                await nc.close()
            last = self._last_error
            if isinstance(exc, TimeoutError):
                reason = "no answer" if last is None else f"no connection ({_describe(last)})"
            else:
                reason = _describe(exc)
            raise ConfigError(f"cannot reach the cluster at {where}: {reason}") from None
        self._js = self.nc.jetstream(timeout=settings.request_timeout)
        try:
            await self._make_stream()
            self.sessions = await self._bucket("sm_sessions", ttl=settings.max_age)
            # No max age: a name is held as long as its session lives, however long.
            self.names = await self._bucket("sm_names")
            self.nodes = await self._bucket("sm_nodes", ttl=settings.node_timeout * 4)
        except (NatsError, TimeoutError) as exc:
            await self.nc.close()
            raise ConfigError(f"the cluster at {where} has no usable JetStream: {exc!r}") from None
        self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _bucket(self, name: str, *, ttl: float | None = None) -> KeyValue:
        """The key-value bucket ``name``, made with ``ttl`` if it does not exist yet. One
        made by a node with other settings (session_ttl, cluster_node_timeout) is used as
        it is, as the stream is: refusing it would keep this node out of the cluster."""
        try:
            return await self.js.create_key_value(bucket=name, ttl=ttl, history=1)
        except BadRequestError:
            return await self.js.key_value(name)

    async def _make_stream(self) -> None:
        settings = self.settings
        config = StreamConfig(
            name=STREAM,
            subjects=list(STREAM_SUBJECTS),
            storage=StorageType.FILE,
            max_age=settings.max_age,
            max_bytes=settings.max_bytes,
            duplicate_window=min(settings.max_age, max(120.0, 2 * settings.session_ttl)),
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            # It exists with other limits: the first node's, or an operator's (replicas on a
            # NATS cluster, say), which are not undone here.
            pass

    async def close(self) -> None:
        if self._publisher is not None:
            # Cancelled until it ends: a cancel that lands in nats-py's flush can be swallowed,
            # and the loop would go back to waiting for the next batch.
            await cancel_and_wait([self._publisher])
        if self.nc is not None and not self.nc.is_closed:
            await self._drain(self.nc)
            if not self.nc.is_closed:
                await self.nc.close()

    async def _drain(self, nc: NodeClient) -> None:
        """Drain ``nc`` within request_timeout. Not ``wait_for``: nats-py's ``drain()`` takes
        the first cancel and goes on to a ``flush()`` of 10 s, so a NATS that stopped
        answering held a stop for 12 s; the second cancel ends it."""
        draining = asyncio.ensure_future(nc.drain())
        done, _ = await asyncio.wait({draining}, timeout=self.settings.request_timeout)
        if not done:
            await cancel_and_wait([draining])
        if draining.done() and not draining.cancelled():
            draining.exception()  # NATS errors and timeouts: the close goes on all the same

    # -- events of the connection ---------------------------------------------------------

    async def _disconnected(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            self._on_lost()

    async def _reconnected(self) -> None:
        await self._on_back()

    async def _error(self, exc: Exception) -> None:
        if self.nc is None:  # the first connect
            self._last_error = exc
            refused = self._refused
            if (
                isinstance(exc, ssl.SSLError | AuthorizationError)
                and refused
                and not refused.done()
            ):
                refused.set_result(exc)
        # While NATS is down every reconnect attempt fails: cluster_lost said it once.
        if self.connected:
            logger.warning("cluster_error", error=repr(exc))
        else:
            logger.debug("cluster_error", error=repr(exc))

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self, subject: str, payload: bytes, *, reply: str = "", headers: dict[str, str] | None
    ) -> None:
        """Queue one publish (sent in order, soon); dropped when the queue is full or the
        link down: the caller's acks then never come, and it retries or refuses."""
        if len(self._queue) >= _PUBLISH_QUEUE:
            return
        self._queue.append((subject, payload, reply, headers))
        self._wake.set()

    async def _publish_loop(self) -> None:
        assert self.nc is not None
        nc = self.nc
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            try:
                await nc.publish_all(batch)
            except NatsError as exc:  # disconnected: the publishes of this batch are lost
                logger.debug("cluster_request_failed", request="publish", error=repr(exc))

    # -- reading -------------------------------------------------------------------------

    async def last_seq(self) -> tuple[int, int]:
        """The stream's (first, last) sequence numbers."""
        info = await self.js.stream_info(STREAM)
        return info.state.first_seq, info.state.last_seq

    async def follow(
        self, after: int, handler: StreamHandler, pause: Pause
    ) -> JetStreamContext.PushSubscription:
        """The node's ordered consumer over the whole stream, from ``after + 1``: ``handler``
        gets each message in stream order ; when it
        returns True, ``pause`` is awaited before the next."""
        assert self.nc is not None
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
        )
        psub = await self.js.subscribe(
            "sm.>",
            stream=STREAM,
            cb=callback(handler, pause),
            ordered_consumer=True,
            idle_heartbeat=1.0,
            config=config,
        )
        return psub

    async def read(self, record: SessionRecord) -> list[StreamMessage]:
        """The stream messages after the record's checkpoint that may be the session's
        (direct to its name, or in one of its filters' rooms), as they are now."""
        subjects = _filter_subjects(record)
        try:
            return await self._read(record.stream_seq, subjects)
        except BadRequestError:  # overlapping filters: read everything, the rule sorts it
            return await self._read(record.stream_seq, ["sm.>"])

    async def _read(self, after: int, subjects: list[str]) -> list[StreamMessage]:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=10.0,
            mem_storage=True,
            filter_subjects=subjects if len(subjects) > 1 else None,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
        )
        info = await self.js.add_consumer(STREAM, config)
        messages: list[StreamMessage] = []
        try:
            pull = await self.js.pull_subscribe_bind(durable=info.name, stream=STREAM)
            left = info.num_pending or 0
            while left > 0:  # bounded: each turn reads at least one message or raises
                batch = await pull.fetch(
                    min(left, _REPLAY_BATCH), timeout=self.settings.request_timeout
                )
                for msg in batch:
                    sseq = stream_position(msg.reply)
                    parse_subject(msg.subject)  # only ours are in the stream
                    messages.append((sseq, msg.subject, msg.data))
                left -= len(batch)
            await pull.unsubscribe()
        finally:
            with contextlib.suppress(NatsError, TimeoutError):
                await self.js.delete_consumer(STREAM, info.name)
        return messages


def _filter_subjects(record: SessionRecord) -> list[str]:
    subjects = {directs_subject(record.name)}
    for span in record.filters:
        if span.end is None or span.end > record.stream_seq:
            subjects.add(filter_subject(span.filter))
    return sorted(subjects)
