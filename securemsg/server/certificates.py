"""The server's certificate over time: reload (SIGHUP, or the files changing), expiry warnings.

A reload builds a new SSL context and hands it to the server for new handshakes; open
connections keep the context they were made with. Whatever fails (a configuration or file
that does not load, a certificate outside its validity) keeps the old context and is logged
once as ``certificate_reload_failed``.

The files are also watched, portably and cheaply: every :data:`WATCH_INTERVAL` seconds their
size, modification time and inode are compared with those loaded. A change is acted on once
it has been the same for two looks in a row, so a certificate and key written one after the
other are loaded together rather than as a mismatched pair.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec
import structlog

from securemsg.config import ServerConfig
from securemsg.errors import ConfigError, TLSConfigError
from securemsg.tls.certinfo import CertInfo, read_cert_info
from securemsg.tls.contexts import server_context

__all__ = ["TLS_FIELDS", "WATCH_INTERVAL", "CertificateKeeper", "load_server_tls"]

logger = structlog.get_logger("securemsg.server.server")

#: The settings a reload applies; the others need a restart.
TLS_FIELDS: Final = (
    "cert",
    "key",
    "ca",
    "require_client_cert",
    "tls13_only",
    "tls_session_tickets",
)
#: Seconds between two looks at the certificate files.
WATCH_INTERVAL: Final = 10.0
#: Seconds between two checks of the certificate's expiry.
EXPIRY_CHECK_INTERVAL: Final = 12 * 3600.0

_Signature = tuple[tuple[int, int, int] | None, ...]


class TLSHost(Protocol):
    """What the keeper changes on the server."""

    config: ServerConfig
    ssl_context: ssl.SSLContext
    broker: Any


class CertificateKeeper:
    def __init__(self, host: TLSHost, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.loop = loop
        self.reloads: Counter[str] = Counter()
        #: When the certificate in use expires (Unix time); None until read.
        self.not_after: float | None = None
        self._loaded = _signature(host.config)
        self._seen = self._loaded
        self._watch: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.check_expiry()
        if self.host.config.cert is not None:
            self._watch = self.loop.call_later(WATCH_INTERVAL, self._look)

    def stop(self) -> None:
        for handle in (self._watch, self._expiry):
            if handle is not None:
                handle.cancel()
        self._watch = self._expiry = None

    def reload(self, load_config: Callable[[], ServerConfig] | None = None) -> bool:
        """Load the certificate, key and CA again; True when the new ones are in use.

        ``load_config`` reads the configuration again (the CLI's file, environment and
        flags), of which the :data:`TLS_FIELDS` are applied; without it the same files are
        read again.
        """
        host = self.host
        try:
            candidate = host.config
            if load_config is not None:
                fresh = load_config()
                changes = {name: getattr(fresh, name) for name in TLS_FIELDS}
                candidate = msgspec.structs.replace(host.config, **changes)
            self._loaded = self._seen = _signature(candidate)
            context, info = load_server_tls(candidate)
        except ConfigError as exc:
            self.reloads["failed"] += 1
            logger.error("certificate_reload_failed", error=str(exc), kept="the old certificate")
            return False
        host.ssl_context, host.config = context, candidate
        # Identity checks follow the client-certificate requirement (mutual TLS names clients).
        host.broker.policy = dataclasses.replace(
            host.broker.policy, require_identity=candidate.require_client_cert
        )
        self.reloads["ok"] += 1
        logger.info(
            "certificate_reloaded",
            cert=candidate.cert,
            subject=info.subject,
            days_left=info.days_left(),
            client_certs_required=candidate.require_client_cert,
        )
        self.check_expiry(info)
        return True

    def look(self) -> bool:
        """Compare the files with those loaded; reload on a change that has settled.

        True when a reload was attempted. Called every :data:`WATCH_INTERVAL` seconds.
        """
        now = _signature(self.host.config)
        settled = now == self._seen
        self._seen = now
        if now == self._loaded or not settled:
            return False
        self.reload()  # records what it loaded: a bad file is reported once, not at every look
        return True

    def _look(self) -> None:
        self._watch = self.loop.call_later(WATCH_INTERVAL, self._look)
        self.look()

    def check_expiry(self, info: CertInfo | None = None) -> None:
        """Warn from cert_expiry_warning_days before expiry; again every 12 hours."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self.loop.call_later(EXPIRY_CHECK_INTERVAL, self.check_expiry)
        config = self.host.config
        if info is None and config.cert is not None:
            try:
                info = read_cert_info(config.cert)
            except TLSConfigError as exc:
                logger.warning("certificate_unreadable", error=str(exc))
                return
        if info is None:
            return
        self.not_after = info.not_after.timestamp()
        days_left = info.days_left()
        if days_left <= config.cert_expiry_warning_days:
            logger.warning(
                "certificate_expiring",
                cert=config.cert,
                subject=info.subject,
                days_left=days_left,
                not_after=info.not_after.isoformat(),
            )


def server_context_for(config: ServerConfig) -> ssl.SSLContext:
    """The server's SSL context from the TLS settings of ``config`` (``cert`` is set)."""
    assert config.cert is not None
    return server_context(
        cert=config.cert,
        key=config.key,
        ca=config.ca,
        require_client_cert=config.require_client_cert,
        tls13_only=config.tls13_only,
        session_tickets=config.tls_session_tickets,
    )


def load_server_tls(config: ServerConfig) -> tuple[ssl.SSLContext, CertInfo]:
    """The server's context and its certificate, refused unless valid now."""
    if config.cert is None:
        raise TLSConfigError("the server has no certificate file to reload (--cert)")
    context = server_context_for(config)
    info = read_cert_info(config.cert)
    if not info.valid_at():
        expired = info.days_left() < 0
        when = info.not_after.date() if expired else info.not_before.date()
        state = "expired on" if expired else "is not valid before"
        raise TLSConfigError(f"certificate file {config.cert} (--cert) {state} {when}")
    return context, info


def _signature(config: ServerConfig) -> _Signature:
    found: list[tuple[int, int, int] | None] = []
    for path in (config.cert, config.key, config.ca):
        try:
            stat = os.stat(path) if path is not None else None
        except OSError:
            stat = None
        found.append(None if stat is None else (stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(found)
