"""Argument parsing of the ``securemsg`` command (no network)."""

from __future__ import annotations

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
