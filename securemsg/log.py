"""Logging: structlog, configured once by the command line, written to stderr.

Library code only asks for a logger (``structlog.get_logger()``) and
logs snake_case events with keyword context; it never configures anything. The CLI calls
:func:`configure_logging` once, before it starts a server or client; calling it again with the
same arguments does nothing, so it is cheap to call defensively. Applications that embed
securemsg configure structlog themselves; until somebody does, structlog's own default applies,
which prints to *stdout* in its development format.

The configured chain: context variables (``structlog.contextvars.bound_contextvars``), level,
ISO UTC timestamp, :func:`redact`, then JSON lines (``{"event": ..., "level": ...,
"timestamp": ..., <context>}``) when the stream is not a terminal, or structlog's console
renderer when it is. Loggers filter by level before doing any work, so ``log.debug(...)``
below the level costs a method call, and they are cached on first use.

Because of that cache, a logger proxy kept in a module global
(``_log = structlog.get_logger()``) keeps the configuration in force when it was first used.
Tests that use ``structlog.testing.capture_logs`` should therefore run with structlog
unconfigured or reset (``structlog.reset_defaults()``), and long-lived objects should bind
their logger when they are created (``self._log = structlog.get_logger().bind(peer=...)``).
"""

from __future__ import annotations

import sys
from typing import Final, Literal, TextIO, get_args

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from securemsg.errors import ConfigError

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "REDACTED",
    "REDACTED_KEYS",
    "LogFormat",
    "LogLevel",
    "configure_logging",
    "logs_at",
    "redact",
]

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["auto", "json", "console"]
LOG_LEVELS: Final[tuple[LogLevel, ...]] = get_args(LogLevel)
LOG_FORMATS: Final[tuple[LogFormat, ...]] = get_args(LogFormat)
REDACTED: Final = "[redacted]"
#: Event keys whose values are never written, whoever passes them.
REDACTED_KEYS: Final = frozenset({"body", "token", "key", "password", "secret", "session_token"})

#: The standard library's level numbers, which structlog's filtering loggers compare.
_LEVEL_NUMBERS: Final[dict[LogLevel, int]] = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "error": 40,
    "critical": 50,
}

# What configure_logging last installed: (level, json, stream, processors).
_installed: tuple[str, bool, TextIO, list[Processor]] | None = None


def redact(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Replace the value of every key in :data:`REDACTED_KEYS` with ``"[redacted]"``."""
    if not REDACTED_KEYS.isdisjoint(event_dict):
        for key in REDACTED_KEYS.intersection(event_dict):
            event_dict[key] = REDACTED
    return event_dict


def logs_at(level: LogLevel) -> bool:
    """Whether the structlog configuration in force writes events at ``level``.

    False only where its loggers filter by level (``make_filtering_bound_logger``, as
    :func:`configure_logging` sets) and ``level`` is below theirs. A filtered event costs a
    method call, but binding a logger and building the event's context still cost something:
    for the few events of every connection, a server asks this once, when it starts (as
    structlog's loggers keep the configuration of their first use).
    """
    check = getattr(structlog.get_logger().bind(), "is_enabled_for", None)
    return True if check is None else bool(check(_LEVEL_NUMBERS[level]))


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def configure_logging(
    *, level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Send structlog output to ``stream`` (default stderr) at ``level`` and above.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise).
    """
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    global _installed
    out = sys.stderr if stream is None else stream
    terminal = _is_terminal(out)
    as_json = fmt == "json" or (fmt == "auto" and not terminal)
    if (
        _installed is not None
        and _installed[:2] == (level, as_json)
        and _installed[2] is out
        and structlog.get_config()["processors"] is _installed[3]
    ):
        return
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    if as_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=terminal))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    _installed = (level, as_json, out, processors)
