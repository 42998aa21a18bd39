"""Typed configuration: defaults < TOML file < environment < command-line flags.

One name, four spellings. ``heartbeat_interval`` is the attribute and keyword, the key
``heartbeat_interval`` in the ``[server]`` (or ``[client]``) table of a TOML file, the
environment variable ``SECUREMSG_HEARTBEAT_INTERVAL`` and the flag ``--heartbeat-interval``.
:func:`load_config` merges them in that order (a flag beats the environment, which beats the
file, which beats the default), types every value and then validates the whole. Every
mistake is a :class:`~securemsg.errors.ConfigError` whose message is one sentence that
starts with where the value came from (the file, the variable or the flag)::

    config/server.toml: unknown key 'heartbeat_intervall' in [server] (did you mean ...?)
    SECUREMSG_PORT: expected an integer, got 'abc'
    --heartbeat-timeout: heartbeat_timeout (1.0) must be greater than heartbeat_interval (10.0)

Empty environment variables count as unset. The token is never shown: ``repr()`` masks it,
:func:`add_config_flags` adds no ``--token`` flag (command lines are visible to every user
of the machine) and the example files leave it out; pass it in ``SECUREMSG_TOKEN`` or put it
in ``token_file``. Certificate files are checked by :mod:`securemsg.tls.contexts`, not here.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, NamedTuple, TypeVar, cast, get_args

import msgspec

from securemsg.core.address import Address, parse_addresses
from securemsg.core.gatekeeper import DEFAULT_MAX_DEPTH, MAX_MAX_DEPTH
from securemsg.core.messages import is_valid_name
from securemsg.errors import ConfigError
from securemsg.log import LOG_FORMATS, LOG_LEVELS, LogFormat, LogLevel

StoreSync = Literal["normal", "full"]

__all__ = [
    "ENV_PREFIX",
    "FIELD_HELP",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ClientConfig",
    "LogFormat",
    "LogLevel",
    "ServerConfig",
    "StoreSync",
    "add_config_flags",
    "fields_with_defaults",
    "load_config",
    "overrides_from_args",
    "read_token",
]

ENV_PREFIX: Final = "SECUREMSG_"
_MIB: Final = 1024 * 1024


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Shared behaviour: validation on construction and a repr that masks the token."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        problem = _find_problem(cast("ServerConfig | ClientConfig", self))
        if problem is not None:
            raise _InvalidValueError(*problem)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={_masked(self, name)!r}" for name in self.__struct_fields__)
        return f"{type(self).__name__}({shown})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [(name, _masked(self, name)) for name in self.__struct_fields__]


#: The longest busy poll: past a millisecond the spin costs more than a wake-up.
MAX_BUSY_POLL_US: Final = 1_000


class ServerConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``securemsg serve`` can be told; read from the ``[server]`` table."""

    section: ClassVar[str] = "server"

    host: str = "127.0.0.1"
    port: int = 7443
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False
    tls13_only: bool = False
    tls_session_tickets: int = 0
    token_file: str | None = None
    token: str | None = None
    handshake_timeout: float = 10.0
    busy_poll_us: int = 200
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 30.0
    session_ttl: float = 60.0
    max_pending: int = 10_000
    max_pending_bytes: int = 16 * _MIB
    slow_consumer_timeout: float = 10.0
    max_outgoing_bytes: int = 8 * _MIB
    max_frame: int = 1 * _MIB
    max_depth: int = DEFAULT_MAX_DEPTH
    max_connections: int = 10_000
    max_sessions: int = 20_000
    max_disconnected_bytes: int = 256 * _MIB
    max_subscriptions: int = 1_000
    max_invalid_frames: int = 100
    max_msgs_per_sec: float = 0.0
    dedup_window: int = 10_000
    shutdown_timeout: float = 5.0
    store: str | None = None
    store_sync: StoreSync = "normal"
    cluster: str | None = None
    node_name: str | None = None
    advertise: str | None = None
    cluster_credentials: str | None = None
    cluster_user: str | None = None
    cluster_password: str | None = None
    cluster_ca: str | None = None
    cluster_cert: str | None = None
    cluster_key: str | None = None
    cluster_max_bytes: int = 1024 * _MIB
    cluster_node_timeout: float = 3.0
    cluster_request_timeout: float = 2.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    datagram_port: int | Literal["off"] | None = None
    datagram_source_rate: float = 20.0
    max_associations: int = 10_000
    datagram_handshake_timeout: float = 5.0
    datagram_idle_timeout: float = 60.0
    loop_stall_threshold: float = 0.5
    cert_expiry_warning_days: int = 30
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"


class ClientConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a client command can be told; read from the ``[client]`` table."""

    section: ClassVar[str] = "client"

    host: str = "localhost"
    port: int = 7443
    servers: tuple[str, ...] | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    name: str | None = None
    token: str | None = None
    reconnect_base: float = 0.5
    reconnect_cap: float = 30.0
    max_attempts: int = 0
    max_outbox: int = 10_000
    max_outbox_bytes: int = 16 * _MIB
    heartbeat_interval: float | None = None
    heartbeat_timeout: float | None = None
    connect_timeout: float = 10.0
    busy_poll_us: int = 200
    session_file: str | None = None
    log_format: LogFormat = "auto"
    log_level: LogLevel = "warning"

    def addresses(self) -> list[Address]:
        """The servers to try, in order: ``servers`` when set (``port`` for those without
        one), else ``host:port``."""
        if self.servers:
            return parse_addresses(self.servers, default_port=self.port)
        return [Address(self.host, self.port)]


#: One short line per option and section; used for ``--help``, the docs and the example files.
FIELD_HELP: Final[dict[str, dict[str, str]]] = {
    "server": {
        "host": "address to listen on",
        "port": "TCP port to listen on; 0 picks a free one",
        "cert": "server certificate chain, PEM file",
        "key": "private key of the server certificate, PEM file",
        "ca": "CA bundle that client certificates must chain to, PEM file",
        "require_client_cert": "require a client certificate signed by the CA (mutual TLS)",
        "tls13_only": "accept TLS 1.3 only instead of TLS 1.2 and newer",
        "tls_session_tickets": "TLS session tickets sent after a full handshake, so a "
        "reconnecting client can resume; 0: off (see the security doc before turning on)",
        "token_file": "file holding the token clients must present",
        "token": "token clients must present; set SECUREMSG_TOKEN, never a file or flag",
        "handshake_timeout": "seconds a new connection has to finish TLS and hello",
        "busy_poll_us": "microseconds the server keeps polling after a message instead of "
        f"sleeping, so the next one needs no wake-up; 0 to {MAX_BUSY_POLL_US}, 0: off",
        "heartbeat_interval": "seconds between heartbeats, advertised to clients",
        "heartbeat_timeout": "seconds of silence after which a peer counts as dead",
        "session_ttl": "seconds a disconnected client's session is kept for resuming",
        "max_pending": "unacknowledged messages kept per session",
        "max_pending_bytes": "bytes of unacknowledged messages kept per session",
        "slow_consumer_timeout": "seconds a congested session may acknowledge nothing while "
        "publishers wait for it before it is cut",
        "max_outgoing_bytes": "bytes buffered for writing to one client; the rest waits in "
        "its session",
        "max_frame": "largest frame accepted, in bytes",
        "max_depth": f"arrays and objects a message body may nest, 1 to {MAX_MAX_DEPTH}",
        "max_connections": "connections served at once",
        "max_sessions": "sessions kept, connected or not; past it the longest disconnected "
        "one ends, and a new session is refused when none is disconnected",
        "max_disconnected_bytes": "bytes held for all disconnected sessions together "
        "(undelivered messages, remembered ids); past it the longest disconnected ones end",
        "max_subscriptions": "rooms and filters one session may join",
        "max_invalid_frames": "invalid frames one connection may send before it is closed",
        "max_msgs_per_sec": "messages per second one client may send; 0 means no limit",
        "dedup_window": "recent message ids remembered per client to drop duplicates",
        "shutdown_timeout": "seconds to drain connections when shutting down",
        "store": "SQLite file that keeps sessions across restarts; none keeps them in memory",
        "store_sync": "when a commit is durable: normal (survives a crash) or full (power loss)",
        "cluster": "NATS servers to join as a cluster node, nats://HOST:PORT[,nats://...]; "
        "none: a single server",
        "node_name": "this node's name in the cluster, unique in it; none: the listener's "
        "host:port (the machine's name for a host of 0.0.0.0 or ::)",
        "advertise": "HOST:PORT clients reach this node at, sent to them in welcome.nodes; "
        "none: as node_name's default",
        "cluster_credentials": "NATS credentials file (.creds) for the cluster",
        "cluster_user": "NATS user name for the cluster",
        "cluster_password": "NATS password; set SECUREMSG_CLUSTER_PASSWORD, never a file or flag",
        "cluster_ca": "CA file the NATS servers' certificates chain to (TLS to NATS)",
        "cluster_cert": "certificate this node presents to NATS (mutual TLS), PEM",
        "cluster_key": "private key of cluster_cert, PEM (default: in cluster_cert)",
        "cluster_max_bytes": "bytes the cluster's message stream keeps at most (JetStream)",
        "cluster_node_timeout": "seconds without a beat after which a node counts as dead",
        "cluster_request_timeout": "seconds every request to NATS (a record, a replay, a flush) "
        "may take before it counts as failed",
        "metrics_port": "port of the HTTP listener for /metrics, /healthz, /readyz; none: off",
        "metrics_host": "address of the metrics and health listener",
        "datagram_port": "UDP port of the DTLS (datagram) listener; none: the TCP port's "
        "number; off: no datagram listener",
        "datagram_source_rate": "datagrams a second one source address may send before it "
        "has an association (handshakes; a burst of as many); 0 means no limit",
        "max_associations": "DTLS associations at once, handshaking or established",
        "datagram_handshake_timeout": "seconds a DTLS association has to finish its handshake",
        "datagram_idle_timeout": "seconds a DTLS association may stay silent before it ends",
        "loop_stall_threshold": "seconds of event-loop lag logged as loop_stalled; 0: off",
        "cert_expiry_warning_days": "days before the certificate expires to warn in the log",
        "log_format": "log format on stderr: auto (JSON unless a terminal), json or console",
        "log_level": "lowest level logged: debug, info, warning, error or critical",
    },
    "client": {
        "host": "server host name, also checked against its certificate",
        "port": "server TCP port",
        "servers": "several servers (cluster nodes) to try in turn, host[:port] separated by "
        "commas; replaces host and port, which gives the port of those without one",
        "ca": "CA bundle the server certificate must chain to; none means the system CAs",
        "cert": "client certificate chain for mutual TLS, PEM file",
        "key": "private key of the client certificate, PEM file",
        "name": "name to register as (letters, digits, _ . @ -); needed unless mutual TLS",
        "token": "token to present; set SECUREMSG_TOKEN, never a file or flag",
        "reconnect_base": "seconds before the first reconnect attempt",
        "reconnect_cap": "longest wait in seconds between reconnect attempts",
        "max_attempts": "reconnect attempts before giving up; 0 means never give up",
        "max_outbox": "unacknowledged sent messages kept for resending",
        "max_outbox_bytes": "bytes of unacknowledged sent messages kept for resending",
        "heartbeat_interval": "seconds between heartbeats; none: as the server says",
        "heartbeat_timeout": "seconds of silence before reconnecting; none: as the server says",
        "connect_timeout": "seconds to connect, finish TLS and be welcomed",
        "busy_poll_us": "microseconds the client keeps polling after messages came instead of "
        f"sleeping, so a reply to what it sends next needs no wake-up; 0 to {MAX_BUSY_POLL_US}, "
        "0: off",
        "session_file": "file that keeps the session across restarts of the process; one "
        "process per file",
        "log_format": "log format on stderr: auto (JSON unless a terminal), json or console",
        "log_level": "lowest level logged: debug, info, warning, error or critical",
    },
}

T = TypeVar("T", bound=_Config)

# -- validation ------------------------------------------------------------------------------

_DURATIONS: Final = frozenset(
    "handshake_timeout heartbeat_interval heartbeat_timeout session_ttl shutdown_timeout"
    " slow_consumer_timeout datagram_handshake_timeout datagram_idle_timeout"
    " reconnect_base reconnect_cap connect_timeout cluster_node_timeout"
    " cluster_request_timeout".split()
)
_SIZES: Final = frozenset(
    (
        "max_pending max_pending_bytes max_outgoing_bytes max_frame max_connections dedup_window"
        " max_outbox max_outbox_bytes max_sessions max_disconnected_bytes max_subscriptions"
        " max_invalid_frames max_associations cluster_max_bytes"
    ).split()
)
_ZERO_MEANS_OFF: Final = frozenset(
    {
        "max_msgs_per_sec",
        "max_attempts",
        "loop_stall_threshold",
        "cert_expiry_warning_days",
        "datagram_source_rate",
        "tls_session_tickets",
        "busy_poll_us",
    }
)
#: Ports that may also be the word ``off``.
_PORT_OR_OFF: Final = frozenset({"datagram_port"})
STORE_SYNCS: Final = get_args(StoreSync)

_Problem = tuple[tuple[str, ...], str]


class _InvalidValueError(ConfigError):
    """A value that has the right type but is out of range; ``keys`` are the fields to blame."""

    def __init__(self, keys: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.keys = keys
        self.message = message


def _find_problem(config: ServerConfig | ClientConfig) -> _Problem | None:
    """The first out-of-range value as (fields involved, sentence), or None when all is well."""
    for name in config.__struct_fields__:
        value = getattr(config, name)
        if value is None:
            continue
        if name in _DURATIONS and not (value > 0 and math.isfinite(value)):
            return (name,), f"{name} must be a number of seconds greater than 0, got {value!r}"
        if name in _SIZES and value < 1:
            return (name,), f"{name} must be at least 1, got {value!r}"
        if name in _ZERO_MEANS_OFF and not (value >= 0 and math.isfinite(value)):
            zero = (
                "no limit"
                if name in {"max_msgs_per_sec", "max_attempts", "datagram_source_rate"}
                else "off"
            )
            return (name,), f"{name} must be 0 ({zero}) or more, got {value!r}"
    if isinstance(config, ServerConfig) and not 1 <= config.max_depth <= MAX_MAX_DEPTH:
        # Clients decode bodies recursively: past a few hundred levels they would fail.
        return ("max_depth",), (
            f"max_depth must be between 1 and {MAX_MAX_DEPTH}, got {config.max_depth!r}"
        )
    if not 0 <= config.busy_poll_us <= MAX_BUSY_POLL_US:
        return ("busy_poll_us",), (
            f"busy_poll_us must be between 0 (off) and {MAX_BUSY_POLL_US}, got"
            f" {config.busy_poll_us!r}"
        )
    low_port = 1 if isinstance(config, ClientConfig) else 0
    if not low_port <= config.port <= 65535:
        return ("port",), f"port must be between {low_port} and 65535, got {config.port!r}"
    for name in ("metrics_port", "datagram_port"):
        port = getattr(config, name, None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            return (name,), f"{name} must be between 0 and 65535, got {port!r}"
    for name, allowed in (
        ("log_format", LOG_FORMATS),
        ("log_level", LOG_LEVELS),
        ("store_sync", STORE_SYNCS),
    ):
        if getattr(config, name, None) not in (*allowed, None):
            return (name,), f"{name} must be {_one_of(allowed)}, got {getattr(config, name)!r}"
    if isinstance(config, ClientConfig):
        if config.servers is not None:
            try:
                parse_addresses(config.servers, default_port=config.port)
            except ValueError as exc:
                return ("servers",), f"servers must be host[:port] addresses: {exc}"
        if config.name is not None and not is_valid_name(config.name):
            return ("name",), (
                f"name must be 1 to 64 letters, digits, '_', '.', '@' or '-', got {config.name!r}"
            )
        if config.reconnect_cap < config.reconnect_base:
            return ("reconnect_cap", "reconnect_base"), (
                f"reconnect_cap ({config.reconnect_cap!r}) must be at least "
                f"reconnect_base ({config.reconnect_base!r})"
            )
    if isinstance(config, ServerConfig):
        problem = _cluster_problem(config)
        if problem is not None:
            return problem
    interval, timeout = config.heartbeat_interval, config.heartbeat_timeout
    if interval is not None and timeout is not None and timeout <= interval:
        return ("heartbeat_timeout", "heartbeat_interval"), (
            f"heartbeat_timeout ({timeout!r}) must be greater than "
            f"heartbeat_interval ({interval!r})"
        )
    return None


_NODE_NAME: Final = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}\Z")
_HOST_PORT: Final = re.compile(r"^\S+:[0-9]{1,5}\Z")


def _cluster_problem(config: ServerConfig) -> _Problem | None:
    if config.cluster is None:
        for name in (
            "node_name",
            "advertise",
            "cluster_credentials",
            "cluster_user",
            "cluster_ca",
            "cluster_cert",
            "cluster_key",
        ):
            if getattr(config, name) is not None:
                return (name,), f"{name} is a cluster setting: it needs cluster (the NATS servers)"
        return None
    if config.store is not None:
        return ("store", "cluster"), (
            "store and cluster cannot be used together: in a cluster JetStream keeps the"
            " sessions, so leave store out"
        )
    for url in config.cluster.split(","):
        if not re.match(r"^(nats|tls)://\S+\Z", url.strip()):
            return ("cluster",), (
                f"cluster must be nats://HOST:PORT addresses separated by commas, got {url!r}"
            )
    if config.node_name is not None and not _NODE_NAME.match(config.node_name):
        return ("node_name",), (
            "node_name must be 1 to 64 letters, digits, '_', '.', ':', '@' or '-', got"
            f" {config.node_name!r}"
        )
    if config.advertise is not None and not _HOST_PORT.match(config.advertise):
        return ("advertise",), f"advertise must be HOST:PORT, got {config.advertise!r}"
    if config.cluster_key is not None and config.cluster_cert is None:
        return ("cluster_key",), "cluster_key was given without cluster_cert (the certificate)"
    if config.cluster_credentials is not None and config.cluster_user is not None:
        return ("cluster_credentials", "cluster_user"), (
            "cluster_credentials and cluster_user cannot be used together: choose one way to"
            " sign in to NATS"
        )
    return None


#: Secrets: masked in repr, never flags (a command line is visible to every user).
_SECRETS: Final = frozenset({"token", "cluster_password"})


def _masked(config: _Config, name: str) -> Any:
    value = getattr(config, name)
    return "***" if name in _SECRETS and value is not None else value


def _shown(name: str, value: Any) -> str:
    """``value`` as an error message may show it: never a token, and never long."""
    if name in _SECRETS:
        return "a value that is not shown (it may be a secret)"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "\u2026"


def _one_of(values: Collection[object]) -> str:
    return "one of " + ", ".join(repr(v) for v in values)


# -- typing each value -----------------------------------------------------------------------


class _Field(NamedTuple):
    name: str
    type: Any  # the annotation, for msgspec.convert
    info: msgspec.inspect.Type  # the same type, inspected (Optional unwrapped)
    default: Any
    choices: tuple[Any, ...]  # a Literal's values in declared order, else ()


@functools.cache
def _fields(cls: type[_Config]) -> dict[str, _Field]:
    found: dict[str, _Field] = {}
    for field in msgspec.structs.fields(cls):
        info = msgspec.inspect.type_info(field.type)
        if isinstance(info, msgspec.inspect.UnionType):
            info = next(t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
        choices = get_args(field.type) if isinstance(info, msgspec.inspect.LiteralType) else ()
        found[field.name] = _Field(field.name, field.type, info, field.default, choices)
    return found


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _is_list(field: _Field) -> bool:
    return isinstance(field.info, msgspec.inspect.VarTupleType)


def _split(text: str) -> tuple[str, ...]:
    """A comma-separated list, as the environment and flags spell a list."""
    return tuple(part.strip() for part in text.split(","))


def _expected(field: _Field, *, text: bool = False) -> str:
    info = field.info
    if _is_list(field):
        return "a list of strings (or one string of comma-separated values)"
    if isinstance(info, msgspec.inspect.BoolType):
        return "a boolean (1/0, true/false, yes/no or on/off)" if text else "true or false"
    if field.name in _PORT_OR_OFF:
        return "a port number or 'off'"
    if isinstance(info, msgspec.inspect.IntType):
        return "an integer"
    if isinstance(info, msgspec.inspect.FloatType):
        return "a number"
    if field.choices:
        return _one_of(field.choices)
    return "a string"


def _typed(field: _Field, value: Any) -> Any:
    """``value`` as the field's type, or ValueError."""
    if _is_list(field) and isinstance(value, str):
        return _split(value)
    try:
        return msgspec.convert(value, field.type, strict=True)
    except msgspec.ValidationError:
        raise ValueError(_expected(field)) from None


def _parsed(field: _Field, text: str) -> Any:
    """An environment string as the field's type, or ValueError."""
    info, stripped = field.info, text.strip()
    if field.name in _PORT_OR_OFF and stripped == "off":
        return "off"
    expected = _expected(field, text=True)
    if isinstance(info, msgspec.inspect.BoolType):
        if stripped.lower() in _TRUE | _FALSE:
            return stripped.lower() in _TRUE
        raise ValueError(expected)
    try:
        if isinstance(info, msgspec.inspect.IntType):
            return int(stripped)
        if isinstance(info, msgspec.inspect.FloatType):
            return float(stripped)
    except ValueError:
        raise ValueError(expected) from None
    if _is_list(field):
        return _split(text)
    if field.choices:
        if stripped not in field.choices:
            raise ValueError(expected)
        return stripped
    return text


def _suggestion(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- loading ---------------------------------------------------------------------------------


def load_config(
    cls: type[T],
    *,
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Merge default < file < environment < overrides into a validated ``cls``.

    ``env`` defaults to :data:`os.environ`; pass ``{}`` to ignore the environment.
    ``overrides`` are flag values (see :func:`overrides_from_args`); None values are skipped.
    """
    fields = _fields(cls)
    values: dict[str, Any] = {}
    sources: dict[str, tuple[int, str]] = {}  # field -> (precedence, where it came from)
    if path is not None:
        for name, value in _read_file(cls, Path(path)).items():
            values[name], sources[name] = value, (1, str(path))
    environ = os.environ if env is None else env
    for name, field in fields.items():
        variable = ENV_PREFIX + name.upper()
        text = environ.get(variable)
        if not text:
            continue
        try:
            values[name] = _parsed(field, text)
        except ValueError as exc:
            raise ConfigError(f"{variable}: expected {exc}, got {text!r}") from None
        sources[name] = (2, variable)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        flag = _flag(name)
        if name not in fields:
            hint = _suggestion(name, fields)
            raise ConfigError(f"{flag}: unknown {cls.section} option {name!r}{hint}")
        try:
            values[name] = _typed(fields[name], value)
        except ValueError as exc:
            raise ConfigError(f"{flag}: expected {exc}, got {_shown(name, value)}") from None
        sources[name] = (3, flag)
    try:
        return cls(**values)
    except _InvalidValueError as exc:
        blamed = [sources[key] for key in exc.keys if key in sources]  # first key wins ties
        where = max(blamed, key=lambda source: source[0])[1] + ": " if blamed else ""
        raise ConfigError(where + exc.message) from None


def _read_file(cls: type[_Config], path: Path) -> dict[str, Any]:
    """The typed values of ``cls.section`` in the TOML file at ``path``."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{path}: cannot read config file ({reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    sections = sorted(FIELD_HELP)
    for name, value in document.items():
        if name not in sections:
            what = "table" if isinstance(value, dict) else "top-level key"
            label = f"[{name}]" if isinstance(value, dict) else repr(name)
            raise ConfigError(
                f"{path}: unknown {what} {label}, expected only [server] and [client] tables"
                + _suggestion(name, sections)
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {name!r} must be a table ([{name}]), got {value!r}")
    fields = _fields(cls)
    values: dict[str, Any] = {}
    for name, value in document.get(cls.section, {}).items():
        if name not in fields:
            raise ConfigError(
                f"{path}: unknown key {name!r} in [{cls.section}]" + _suggestion(name, fields)
            )
        try:
            values[name] = _typed(fields[name], value)
        except ValueError as exc:
            raise ConfigError(
                f"{path}: expected {exc} for {name!r} in [{cls.section}], got {_shown(name, value)}"
            ) from None
    return values


def read_token(config: ServerConfig | ClientConfig) -> str | None:
    """The token: ``config.token`` if set, else the content of ``token_file``, else None.

    Surrounding whitespace is stripped; an empty token counts as none.
    """
    if config.token is not None:
        return config.token.strip() or None
    token_file = getattr(config, "token_file", None)
    if token_file is None:
        return None
    try:
        text = Path(token_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"token_file {token_file!r}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"token_file {token_file!r}: cannot read it ({reason})") from exc
    token = text.strip()
    if not token:
        raise ConfigError(f"token_file {token_file!r}: the file is empty")
    return token


# -- flags and docs --------------------------------------------------------------------------

#: Fields that never become flags: a command line is visible to every user of the machine.
_NOT_FLAGS: Final = _SECRETS


class _RefusedFlag(argparse.Action):
    """A hidden flag that fails with advice, so ``--token`` never abbreviates ``--token-file``."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        message = "a secret on the command line is visible to other users; set SECUREMSG_"
        raise argparse.ArgumentError(self, message + f"{self.dest.upper()} instead")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(field: _Field) -> str | None:
    if field.choices:
        return None  # argparse shows the choices
    if field.name == "cert_expiry_warning_days":
        return "DAYS"
    if field.name in {"max_msgs_per_sec", "datagram_source_rate"}:
        return "RATE"
    if field.name in _DURATIONS or field.name == "loop_stall_threshold":
        return "SECONDS"
    if field.name in {
        "max_outgoing_bytes",
        "max_frame",
        "max_pending_bytes",
        "max_outbox_bytes",
        "max_disconnected_bytes",
        "cluster_max_bytes",
    }:
        return "BYTES"
    if field.name in _PORT_OR_OFF:
        return "PORT|off"
    if isinstance(field.info, msgspec.inspect.IntType):
        return "PORT" if field.name.endswith("port") else "N"
    if field.name in {
        "cert",
        "key",
        "ca",
        "token_file",
        "store",
        "session_file",
        "cluster_credentials",
        "cluster_ca",
        "cluster_cert",
        "cluster_key",
    }:
        return "PATH"
    if field.name == "cluster":
        return "NATS_URLS"
    if field.name == "advertise":
        return "HOST:PORT"
    if field.name in {"node_name", "cluster_user"}:
        return "NAME"
    if field.name == "metrics_host":
        return "HOST"
    if field.name == "servers":
        return "HOST:PORT,..."
    return field.name.upper()


def _default_text(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[_Config],
    *,
    exclude: Collection[str] = (),
) -> None:
    """Add ``--field-name`` for every field of ``cls`` but those in ``exclude``.

    Every flag defaults to None, so :func:`overrides_from_args` sees only what was given.
    ``--token`` is hidden and refused with advice to use the environment instead.
    """
    help_texts = FIELD_HELP[cls.section]
    for name, field in _fields(cls).items():
        if name in exclude:
            continue
        if name in _NOT_FLAGS:
            parser.add_argument(_flag(name), dest=name, action=_RefusedFlag, help=argparse.SUPPRESS)
            continue
        text = f"{help_texts[name]} (default: {_default_text(field.default)})"
        text = text.replace("%", "%%")
        if isinstance(field.info, msgspec.inspect.BoolType):
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
            continue
        if name in _PORT_OR_OFF:
            kind: Any = _port_or_off
            choices: list[Any] | None = None
        elif field.choices:
            kind = str
            choices = list(field.choices)
        else:
            kind = {msgspec.inspect.IntType: int, msgspec.inspect.FloatType: float}.get(
                type(field.info), str
            )
            choices = None
        parser.add_argument(
            _flag(name),
            dest=name,
            type=kind,
            choices=choices,
            default=None,
            metavar=_metavar(field),
            help=text,
        )


def _port_or_off(text: str) -> int | str:
    if text.strip() == "off":
        return "off"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'off', got {text!r}") from None


def overrides_from_args(args: argparse.Namespace, cls: type[_Config]) -> dict[str, Any]:
    """The fields of ``cls`` that were given as flags (those not None in ``args``)."""
    given: dict[str, Any] = {}
    for name in _fields(cls):
        value = getattr(args, name, None)
        if value is not None:
            given[name] = value
    return given


def fields_with_defaults(cls: type[_Config]) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for every field of ``cls``, in declaration order."""
    help_texts = FIELD_HELP[cls.section]
    return [(name, field.default, help_texts[name]) for name, field in _fields(cls).items()]
