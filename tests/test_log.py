from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from securemsg.errors import ConfigError
from securemsg.log import REDACTED, REDACTED_KEYS, configure_logging, logs_at, redact


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_on_a_stream_that_is_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    structlog.get_logger().info("server_started", port=7443)
    [line] = json_lines(stream)
    assert line["event"] == "server_started"
    assert line["level"] == "info"
    assert line["port"] == 7443
    timestamp = datetime.fromisoformat(line["timestamp"])
    assert timestamp.utcoffset() == UTC.utcoffset(None)


def test_console_output_on_a_terminal() -> None:
    stream = FakeTerminal()
    configure_logging(stream=stream)
    structlog.get_logger().warning("peer_timed_out", peer="alice")
    output = stream.getvalue()
    assert "peer_timed_out" in output
    assert "alice" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


def test_format_json_wins_even_on_a_terminal() -> None:
    stream = FakeTerminal()
    configure_logging(stream=stream, fmt="json")
    structlog.get_logger().info("started")
    assert json_lines(stream)[0]["event"] == "started"


def test_logs_go_to_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    structlog.get_logger().info("server_started")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "server_started" in captured.err


def test_events_below_the_level_are_dropped() -> None:
    stream = io.StringIO()
    configure_logging(level="warning", stream=stream)
    log = structlog.get_logger()
    log.debug("frame_received", size=10)
    log.info("client_connected")
    log.warning("client_too_slow")
    log.error("accept_failed")
    assert [line["event"] for line in json_lines(stream)] == ["client_too_slow", "accept_failed"]


def test_logs_at_says_which_levels_the_configuration_in_force_writes() -> None:
    assert logs_at("debug")  # structlog's own default writes everything
    configure_logging(level="warning", stream=io.StringIO())
    assert not logs_at("info")
    assert logs_at("warning")
    assert logs_at("error")
    structlog.reset_defaults()
    assert logs_at("info")


def test_debug_events_are_written_at_debug_level() -> None:
    stream = io.StringIO()
    configure_logging(level="debug", stream=stream)
    structlog.get_logger().debug("frame_received", size=10)
    assert json_lines(stream)[0]["level"] == "debug"


def test_secrets_are_redacted_wherever_they_come_from() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    with structlog.contextvars.bound_contextvars(session_token="sess-123"):
        structlog.get_logger(conn=1).info(
            "client_authenticated", token="tok-456", body=b"hello", name="alice"
        )
    [line] = json_lines(stream)
    assert line["token"] == line["session_token"] == line["body"] == REDACTED
    assert line["name"] == "alice"
    assert line["conn"] == 1
    assert "tok-456" not in stream.getvalue()
    assert "sess-123" not in stream.getvalue()


def test_redact_replaces_every_secret_key_and_nothing_else() -> None:
    event = {key: "x" for key in REDACTED_KEYS} | {"event": "e", "room": "r"}
    assert redact(None, "info", event) == {key: REDACTED for key in REDACTED_KEYS} | {
        "event": "e",
        "room": "r",
    }


def test_exceptions_are_rendered_into_the_json_line() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    try:
        raise ValueError("bad frame")
    except ValueError:
        structlog.get_logger().exception("handler_failed")
    [line] = json_lines(stream)
    assert line["level"] == "error"
    assert "ValueError: bad frame" in line["exception"]


def test_configuring_twice_with_the_same_arguments_changes_nothing() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    processors = structlog.get_config()["processors"]
    configure_logging(stream=stream)
    assert structlog.get_config()["processors"] is processors
    configure_logging(stream=stream, level="debug")
    assert structlog.get_config()["processors"] is not processors


def test_configuring_after_a_reset_configures_again() -> None:
    first = io.StringIO()
    configure_logging(stream=first)
    structlog.reset_defaults()
    configure_logging(stream=first)
    structlog.get_logger().info("again")
    assert json_lines(first)[0]["event"] == "again"


@pytest.mark.parametrize(("level", "fmt"), [("loud", "auto"), ("info", "xml")])
def test_bad_level_or_format_is_a_config_error(level: str, fmt: str) -> None:
    with pytest.raises(ConfigError):
        configure_logging(level=level, fmt=fmt, stream=io.StringIO())


def test_capture_logs_sees_library_events() -> None:
    with capture_logs() as logs:
        structlog.get_logger().info("room_joined", room="news")
    assert logs == [{"event": "room_joined", "room": "news", "log_level": "info"}]


def test_capture_logs_works_after_configure_logging_is_reset() -> None:
    configure_logging(stream=io.StringIO())
    structlog.reset_defaults()
    with capture_logs() as logs:
        structlog.get_logger("securemsg.server.server").warning("client_too_slow", queued=3)
    assert logs == [{"event": "client_too_slow", "queued": 3, "log_level": "warning"}]
