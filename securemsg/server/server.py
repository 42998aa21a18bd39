"""The asyncio TLS server: listening, accepting, TLS, lifecycle and shutdown.

The loop accepts on our listening sockets (``loop.create_server(sock=...)``, with no ``ssl``:
the loops' SSL transports hide failed handshakes and keep a 256 KiB buffer per connection).
Each accepted connection is an :class:`~securemsg.server.incoming.Incoming` until its TLS
handshake is done: counted against ``max_connections`` before any TLS work, its ClientHello
looked at (plaintext, HTTP and ALPN offers without ``securemsg/1`` are refused and logged),
then TLS in :class:`~securemsg.server.tlstransport.TLSTransport` under the handshake
timeout, so every failure is visible and logged.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import structlog

from securemsg.busypoll import BusyPoll
from securemsg.config import ServerConfig, read_token
from securemsg.core.messages import BYE_NODE_UNAVAILABLE, BYE_SERVER_SHUTDOWN
from securemsg.core.server_session import ServerSession
from securemsg.errors import ConfigError, StoreError
from securemsg.log import logs_at
from securemsg.server.broker import Broker, Link
from securemsg.server.certificates import CertificateKeeper, server_context_for
from securemsg.server.connection import ServerConnection
from securemsg.server.incoming import Incoming
from securemsg.server.loopwatch import LoopWatch
from securemsg.server.store import MemoryStore, SessionStore, SqliteStore
from securemsg.server.tasks import Tasks
from securemsg.server.timerwheel import TimerWheel

if TYPE_CHECKING:
    from securemsg.server.cluster import ClusterBroker
    from securemsg.server.datagram import DatagramListener
    from securemsg.server.metrics import MetricsListener

__all__ = ["Server"]

logger = structlog.get_logger("securemsg.server.server")

_BACKLOG: Final = 1024


class Server:
    """A securemsg server. ``async with Server(config) as server:`` listens on ``server.port``."""

    def __init__(self, config: ServerConfig, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        if ssl_context is None:
            if config.cert is None:
                raise ConfigError("the server needs a certificate: pass --cert (and --key)")
            ssl_context = server_context_for(config)
        #: The context of new handshakes: a reload replaces it, open connections keep theirs.
        self.ssl_context = ssl_context
        options: dict[str, Any] = {
            "max_pending": config.max_pending,
            "max_pending_bytes": config.max_pending_bytes,
            "dedup_window": config.dedup_window,
            "session_ttl": config.session_ttl,
            "max_msgs_per_sec": config.max_msgs_per_sec,
            "token": read_token(config),
            "require_identity": config.require_client_cert,
            "max_subscriptions": config.max_subscriptions,
            "max_frame": config.max_frame,
            "max_sessions": config.max_sessions,
            "max_disconnected_bytes": config.max_disconnected_bytes,
        }
        #: The broker as a cluster node (``--cluster``), else None.
        self.cluster: ClusterBroker | None = None
        if config.cluster is None:
            self.broker = Broker(store=self._make_store(config), **options)
        else:
            self.broker = self.cluster = _cluster_broker(self, options)
        self.connections: set[ServerConnection] = set()
        # Accepted connections whose TLS handshake is not done yet (max_connections counts
        # them too); aborted when the server stops.
        self._handshaking: set[Incoming] = set()
        self._sockets: list[socket.socket] = []
        self._listeners: list[asyncio.AbstractServer] = []
        self._tasks = Tasks()
        self._expiry: dict[ServerSession[Link], asyncio.TimerHandle] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wheel: TimerWheel | None = None
        self._busy_poll: BusyPoll | None = None
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._stall_check: asyncio.TimerHandle | None = None
        # The slow-consumer rule is checked this often: a stuck session is cut between
        # slow_consumer_timeout and a quarter more.
        self._stall_period = max(0.01, config.slow_consumer_timeout / 4)
        self.port = 0
        # Connections accepted and refused at accept, failed TLS handshakes, and hellos
        # accepted (each started or resumed a session: not a count of sessions).
        self.counts = {"accepted": 0, "refused": 0, "handshake_failed": 0, "hellos_accepted": 0}
        self.sessions_expired = 0
        # Read by the metrics collector at scrape time; incremented off the message path.
        self.refusals: Counter[str] = Counter()
        self.handshake_failures: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        #: Requests answered with an error, by code; the connections count them.
        self.refused_requests: Counter[str] = Counter()
        self.closed_traffic = {"frames_in": 0, "frames_out": 0, "bytes_in": 0, "bytes_out": 0}
        self.loopwatch: LoopWatch | None = None
        self.metrics: MetricsListener | None = None
        #: The DTLS listener (the datagram channel); None when datagram_port is off.
        self.datagram: DatagramListener | None = None
        self._certificates: CertificateKeeper | None = None
        #: Whether info and debug events are written (asked at start: securemsg.log.logs_at).
        self.logs_info = self.logs_debug = True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the server is not started"
        return self._loop

    @property
    def certificates(self) -> CertificateKeeper:
        """Reloads and expiry warnings of the server's certificate (made with the loop)."""
        if self._certificates is None:
            self._certificates = CertificateKeeper(self, self.loop)
        return self._certificates

    @property
    def busy_poll(self) -> BusyPoll:
        """The loop's spin after messages (``busy_poll_us``; made with the loop)."""
        if self._busy_poll is None:
            self._busy_poll = BusyPoll(self.loop, self.config.busy_poll_us / 1e6)
        return self._busy_poll

    @property
    def wheel(self) -> TimerWheel:
        """The connections' heartbeat and handshake deadlines (made with the loop)."""
        if self._wheel is None:
            config = self.config
            shortest = min(config.heartbeat_interval, config.handshake_timeout)
            # A hundredth of the shortest period: deadlines are met within 1 %.
            self._wheel = TimerWheel(self.loop, max(0.001, shortest / 100))
        return self._wheel

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _make_store(self, config: ServerConfig) -> SessionStore:
        if config.store is None:
            return MemoryStore()
        return SqliteStore(
            config.store,
            sync=config.store_sync,
            dedup_window=config.dedup_window,
            on_failure=self._store_failed,
        )

    def _store_failed(self, error: StoreError) -> None:
        # Nothing more can be acknowledged: stop rather than serve without the promise.
        logger.error("store_failed", reason=str(error))
        self._tasks.spawn(self.close())

    async def _restore_sessions(self) -> None:
        stored = await self.broker.store.open()
        now, wall = self.loop.time(), time.time()
        for kept in stored:
            session = self.broker.restore(kept, now=now, wall=wall)
            self.session_detached(session)
        if self.broker.store.durable:
            logger.info("store_opened", path=self.config.store, sessions=len(stored))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.logs_info, self.logs_debug = logs_at("info"), logs_at("debug")
        self._stopped = asyncio.Event()
        await self._restore_sessions()
        if self.config.metrics_port is not None:
            self.metrics = _metrics_listener(self)
        try:
            self._sockets = _listen(self.config.host, self.config.port)
        except BaseException:
            await self.broker.store.close()  # give the file (and its lock) back
            raise
        self.port = self._sockets[0].getsockname()[1]
        await self._start_datagram()
        if self.cluster is not None:
            try:
                await self._join_cluster(self.cluster)
            except BaseException:
                for sock in self._sockets:
                    sock.close()
                if self.datagram is not None:
                    await self.datagram.close()
                raise
        for sock in self._sockets:
            listener = await self.loop.create_server(
                functools.partial(Incoming, self), sock=sock, backlog=_BACKLOG
            )
            self._listeners.append(listener)
        self._stall_check = self.loop.call_later(self._stall_period, self._check_stalled)
        if self.config.loop_stall_threshold > 0 or self.metrics is not None:
            self.loopwatch = LoopWatch(self.loop, threshold=self.config.loop_stall_threshold)
            self.loopwatch.start()
        if self.metrics is not None:
            try:
                await self.metrics.start()
            except OSError as exc:
                await self.close()
                where = f"{self.config.metrics_host}:{self.config.metrics_port}"
                raise ConfigError(
                    f"cannot serve metrics on {where}: {exc.strerror}; choose another"
                    " --metrics-port"
                ) from None
        logger.info(
            "server_listening",
            host=self.config.host,
            port=self.port,
            tls_versions="1.3" if self.config.tls13_only else "1.2,1.3",
            client_certs_required=self.config.require_client_cert,
            max_connections=self.config.max_connections,
        )
        self.certificates.start()

    async def _start_datagram(self) -> None:
        """The DTLS listener, on the TCP port's number unless told otherwise; pyOpenSSL is
        loaded only here, so a server with ``datagram_port = "off"`` never loads it."""
        port = self.config.datagram_port
        if port == "off" or self.config.cert is None:
            return
        from securemsg.server.datagram import DatagramListener

        listener = DatagramListener(self)
        wanted = self.port if port is None else port
        try:
            try:
                await listener.start(self.config.host, wanted)
            except OSError:
                if port is not None or self.config.port != 0:
                    raise
                await listener.start(self.config.host, 0)  # the TCP port's number was taken
        except OSError as exc:
            for sock in self._sockets:
                sock.close()
            await self.broker.store.close()
            raise ConfigError(
                f"cannot listen for datagrams on {self.config.host}:{wanted} (UDP):"
                f" {exc.strerror}; choose another --datagram-port, or off"
            ) from None
        self.datagram = listener

    async def _join_cluster(self, cluster: ClusterBroker) -> None:
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):  # every address: name the machine instead
            host = socket.gethostname()
        where = f"{host}:{self.port}"
        try:
            await cluster.start(
                node=self.config.node_name or where, address=self.config.advertise or where
            )
        except BaseException:
            await cluster.stop()  # the NATS connection, if it was made
            raise

    def _cluster_lost(self) -> None:
        """NATS is gone: every client is told to resume on another node."""
        for conn in list(self.connections):
            conn.send_bye(BYE_NODE_UNAVAILABLE)

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called (from a signal handler, for instance)."""
        if self._loop is None:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    async def close(self) -> None:
        """Stop accepting, say ``bye`` to every client, flush, close within shutdown_timeout."""
        if self._stopping:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        self._stopping = True
        logger.info("server_stopping", connections=len(self.connections))
        if self._stall_check is not None:
            self._stall_check.cancel()
        for listener in self._listeners:
            listener.close()  # and its socket
        for sock in self._sockets:
            sock.close()  # those start() did not get to listen on
        for incoming in list(self._handshaking):
            incoming.abort()
        if self.datagram is not None:
            await self.datagram.close()
        await self._tasks.cancel_all()
        connections = list(self.connections)
        for conn in connections:
            conn.send_bye(BYE_SERVER_SHUTDOWN)
        if connections:
            _, pending = await asyncio.wait(
                [conn.closed for conn in connections], timeout=self.config.shutdown_timeout
            )
            for conn in connections:
                if not conn.closed.done() and conn.transport is not None:
                    conn.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        if self.loopwatch is not None:
            self.loopwatch.stop()
        if self._certificates is not None:
            self._certificates.stop()
        if self.metrics is not None:
            await self.metrics.close()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.broker.store.close()
        logger.info(
            "server_stopped",
            connections_closed=len(connections),
            messages_routed=self.broker.messages_routed,
            **self.counts,
        )
        assert self._stopped is not None
        self._stopped.set()

    # -- accepting (called by Incoming, which the loop makes per accepted connection) --------

    def next_connection_id(self) -> int:
        return next(self._ids)

    @property
    def _pending_handshakes(self) -> int:
        return len(self._handshaking)

    def admit(self, incoming: Incoming, peer: str) -> bool:
        if len(self.connections) + len(self._handshaking) >= self.config.max_connections:
            self.counts["refused"] += 1
            self.refusals["max_connections"] += 1
            logger.warning(
                "connection_refused",
                peer=peer,
                reason="max_connections",
                max_connections=self.config.max_connections,
            )
            return False
        self.counts["accepted"] += 1
        self._handshaking.add(incoming)
        return True

    def handshake_ended(self, incoming: Incoming) -> None:
        self._handshaking.discard(incoming)

    def connection_opened(self, conn: ServerConnection) -> None:
        self.connections.add(conn)
        if self.logs_info:
            self._log_opened(conn)
        if self._stopping:
            conn.send_bye(BYE_SERVER_SHUTDOWN)

    def _log_opened(self, conn: ServerConnection) -> None:
        tls = conn.transport.get_extra_info("ssl_object") if conn.transport else None
        logger.info(
            "connection_opened",
            conn=conn.id,
            peer=conn.peer,
            tls_version=tls.version() if tls else None,
            tls_resumed=tls.session_reused if tls else False,
            identity=conn.identity,
        )

    def _check_stalled(self) -> None:
        if self.broker.stalled:
            for session in self.broker.check_stalled(
                self.loop.time(), self.config.slow_consumer_timeout
            ):
                self.session_ended(session)
        self._stall_check = self.loop.call_later(self._stall_period, self._check_stalled)

    def handshake_failed(self, conn_id: int, peer: str, reason: str) -> None:
        self.counts["handshake_failed"] += 1
        self.handshake_failures[reason] += 1
        logger.warning("tls_handshake_failed", conn=conn_id, peer=peer, reason=reason)

    # -- sessions (called by connections) -----------------------------------------------------

    def connection_closed(self, conn: ServerConnection) -> None:
        self.connections.discard(conn)
        core, traffic = conn.core, self.closed_traffic
        traffic["frames_in"] += core.frames_in
        traffic["frames_out"] += core.frames_out
        traffic["bytes_in"] += core.bytes_in
        traffic["bytes_out"] += core.bytes_out
        self.closes[conn.close_reason] += 1

    def session_attached(self, session: ServerSession[Link]) -> None:
        handle = self._expiry.pop(session, None)
        if handle is not None:
            handle.cancel()
        self.counts["hellos_accepted"] += 1

    def session_detached(self, session: ServerSession[Link]) -> None:
        if session.expires_at is None or self._stopping:
            return
        old = self._expiry.pop(session, None)
        if old is not None:
            old.cancel()
        self._expiry[session] = self.loop.call_at(session.expires_at, self._expire, session)

    def session_ended(self, session: ServerSession[Link]) -> None:
        handle = self._expiry.pop(session, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, session: ServerSession[Link]) -> None:
        self._expiry.pop(session, None)
        if session.link is not None or session.expires_at is None:
            return
        self.sessions_expired += 1
        rooms = self.broker.end(session, reason="expired")
        logger.info(
            "session_expired",
            session=session.id,
            name=session.name,
            rooms=len(rooms),
            undelivered=len(session.delivery),
        )

    # -- health and certificates --------------------------------------------------------------

    def readiness_problems(self) -> list[str]:
        """Why the server would not serve a new client now; empty when it would."""
        problems: list[str] = []
        if self._loop is None or not self._sockets:
            problems.append("not listening")
        elif self._stopping:
            problems.append("shutting down")
        if self.cluster is not None and not self.cluster.available:
            problems.append("the cluster (NATS) is unreachable")
        return problems

    def reload_tls(self, load_config: Callable[[], ServerConfig] | None = None) -> bool:
        """Load the certificate, key and CA again (what SIGHUP does); see
        :meth:`CertificateKeeper.reload`. False, and the old context kept, on any failure."""
        return self.certificates.reload(load_config)

    @property
    def cert_reloads(self) -> Counter[str]:
        return self.certificates.reloads

    @property
    def cert_not_after(self) -> float | None:
        return self.certificates.not_after


def _cluster_broker(server: Server, options: dict[str, Any]) -> ClusterBroker:
    """The broker of a cluster node; NATS is imported only here."""
    try:
        from securemsg.server.cluster import ClusterBroker, ClusterSettings
    except ImportError:
        raise ConfigError("--cluster needs nats-py: pip install 'securemsg[cluster]'") from None
    config = server.config
    assert config.cluster is not None
    settings = ClusterSettings(
        servers=[url.strip() for url in config.cluster.split(",")],
        node="",
        address="",
        credentials=config.cluster_credentials,
        user=config.cluster_user,
        password=config.cluster_password,
        ca=config.cluster_ca,
        cert=config.cluster_cert,
        key=config.cluster_key,
        max_bytes=config.cluster_max_bytes,
        session_ttl=config.session_ttl,
        node_timeout=config.cluster_node_timeout,
        request_timeout=config.cluster_request_timeout,
        # Three beats per node_timeout, so one lost beat is no death.
        beat_interval=min(1.0, config.cluster_node_timeout / 3),
    )
    return ClusterBroker(
        settings, on_lost=server._cluster_lost, on_drop=server.session_ended, **options
    )


def _metrics_listener(server: Server) -> MetricsListener:
    try:
        from securemsg.server.metrics import MetricsListener
    except ImportError:
        raise ConfigError(
            "--metrics-port needs prometheus-client: pip install 'securemsg[metrics]'"
        ) from None
    config = server.config
    assert config.metrics_port is not None
    return MetricsListener(server, host=config.metrics_host, port=config.metrics_port)


def _listen(host: str, port: int) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            address: tuple[Any, ...] = tuple(sockaddr)
            if sockets and port == 0:
                # Every address family on the same port, the one the first bind chose.
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"port {port} on {host} is already in use; choose another with --port"
                    ) from None
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
