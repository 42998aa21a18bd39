"""Argument parsing of the ``securemsg`` command (no network)."""

from __future__ import annotations

import os

import pytest

from securemsg.cli.main import parse_args


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "host:7000", "--ca", "ca.pem", "--room", "r", "hello"],
        ["send", "--ca", "ca.pem", "--room", "r", "host:7000", "hello"],
        ["send", "--ca", "ca.pem", "host:7000", "--room", "r", "hello"],
    ],
)
def test_send_takes_the_address_before_or_after_the_options(argv: list[str]) -> None:
    args = parse_args(argv)
    assert args.words == ["host:7000", "hello"]
    assert args.room == "r"


def test_send_without_an_address_takes_the_message_alone() -> None:
    assert parse_args(["send", "--room", "r", "hi"]).words == ["hi"]


def test_unknown_options_are_still_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["send", "h:1", "--room", "r", "hi", "--bogus"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("argv", "usage", "hint"),
    [
        (["listen", "--rooom", "news"], "usage: securemsg listen", "did you mean --room?"),
        (["send", "--connect-timout", "3", "hi"], "usage: securemsg send", "--connect-timeout"),
        (["bench", "pubsub", "--unpased"], "usage: securemsg bench", "did you mean --unpaced?"),
    ],
)  # fmt: skip
def test_an_unknown_option_shows_the_commands_usage_and_the_closest_option(
    argv: list[str], usage: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert f"unrecognized option {argv[-2] if argv[0] == 'listen' else ''}" in err
    assert hint in err


def test_an_abbreviated_option_argparse_takes_is_not_called_unknown() -> None:
    assert parse_args(["listen", "--ro", "news", "--jso"]).json


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "pubsub", "host:7000", "--msgs", "10"],
        ["bench", "pubsub", "--msgs", "10", "host:7000"],
    ],
)
def test_bench_takes_the_address_before_or_after_the_options(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.address, args.msgs) == ("host:7000", 10)


def test_bench_refuses_an_address_with_local(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["bench", "pubsub", "--local", "--msgs", "10", "host:7000"])
    assert "exclude each other" in capsys.readouterr().err


def test_send_help_shows_one_address_and_one_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["send", "--help"])
    out = capsys.readouterr().out
    assert "[HOST[:PORT]] MESSAGE\n" in out
    assert "..." not in out  # one or two words, never a list of them


def test_the_example_server_config_without_a_certificate_points_to_dev_and_the_cert_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from securemsg.cli.main import main

    for name in [name for name in os.environ if name.startswith("SECUREMSG_")]:
        monkeypatch.delenv(name)
    example = Path(__file__).resolve().parents[2] / "config" / "server.toml"
    assert main(["server", "--config", str(example)]) == 1
    err = capsys.readouterr().err
    assert "--dev" in err and "set cert and key" in err and str(example) in err
    assert len(err.strip().splitlines()) == 1
