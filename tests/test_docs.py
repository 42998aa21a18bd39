"""The docs stay true to the code: options, flags, log events, error codes and the README.

Run as a script (``python tests/test_docs.py``) to print the option tables of
``docs/operations.md`` from :func:`securemsg.config.fields_with_defaults`; paste them over the
old ones when an option changes.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from securemsg.cli.main import build_parser
from securemsg.config import ENV_PREFIX, ClientConfig, ServerConfig, fields_with_defaults
from securemsg.core.messages import FATAL_CODES, ErrorCode

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"

INSTALL_AND_RUN = "pip install -e '.[fast]' && securemsg server --dev"
INSTALL_AND_TEST = "pip install -e '.[test,fast]' && pytest -n 2"

#: What goes in the flag column instead of ``--field-name``.
_NO_FLAG: dict[str, dict[str, str]] = {
    "server": {"token": "none"},
    "client": {
        "token": "none",
        "host": "`HOST[:PORT]` argument",
        "port": "`HOST[:PORT]` argument",
        "servers": "`HOST[:PORT],...` argument",
    },
}
_MIB = 1024 * 1024
#: A logger call with a literal event name: ``log.info("joined", ...)``, also across lines.
_LOG_CALL = re.compile(
    r"\.(?:debug|info|warning|error|exception|critical)\(\s*\"([a-z_][a-z0-9_]*)\""
)
#: Event names the code logs under a computed name (``log.warning(event.code, ...)``).
_COMPUTED_EVENTS = ("handshake_timeout", "heartbeat_timeout")


# -- the option tables -----------------------------------------------------------------------


def _default_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int) and value >= _MIB and value % _MIB == 0:
        return f"`{value}` ({value // _MIB} MiB)"
    return f"`{value}`"


def option_table(cls: type[ServerConfig | ClientConfig]) -> str:
    """The Markdown table of every option of ``cls``, as docs/operations.md shows it."""
    no_flag = _NO_FLAG[cls.section]
    lines = [
        "| option (TOML key) | default | flag | environment | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, default, help_text in fields_with_defaults(cls):
        flag = no_flag.get(name) or f"`--{name.replace('_', '-')}`"
        env = f"`{ENV_PREFIX}{name.upper()}`"
        lines.append(f"| `{name}` | {_default_text(default)} | {flag} | {env} | {help_text} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def operations() -> str:
    return OPERATIONS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig])
def test_operations_doc_has_the_current_option_table(
    operations: str, cls: type[ServerConfig | ClientConfig]
) -> None:
    assert option_table(cls) in operations, (
        f"the [{cls.section}] option table in docs/operations.md is stale: regenerate it with"
        " `python tests/test_docs.py`"
    )


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig])
def test_operations_doc_names_every_option(
    operations: str, cls: type[ServerConfig | ClientConfig]
) -> None:
    missing = [name for name, _, _ in fields_with_defaults(cls) if f"`{name}`" not in operations]
    assert not missing


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """The ``securemsg`` subcommands by name, as the CLI parser has them."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the securemsg parser has no subcommands")


def test_operations_doc_names_every_server_flag(operations: str) -> None:
    flags = [
        option
        for action in _subcommands()["server"]._actions
        if action.help is not argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    assert "--heartbeat-interval" in flags
    missing = [flag for flag in flags if f"`{flag}`" not in operations]
    assert not missing


# -- log events and error codes --------------------------------------------------------------


def logged_event_names() -> set[str]:
    """Every event name a logger call in the package spells out."""
    names: set[str] = set(_COMPUTED_EVENTS)
    for path in sorted((ROOT / "securemsg").rglob("*.py")):
        names.update(_LOG_CALL.findall(path.read_text(encoding="utf-8")))
    return names


def test_the_event_scan_finds_events_of_server_and_client() -> None:
    names = logged_event_names()
    assert {"server_listening", "connection_closed", "session_overflowed"} <= names
    assert {"reconnect_scheduled", "client_task_failed"} <= names


def test_operations_doc_describes_every_log_event(operations: str) -> None:
    missing = sorted(name for name in logged_event_names() if f"| `{name}` |" not in operations)
    assert not missing, "add a row to the log event tables of docs/operations.md"


def test_operations_doc_lists_every_error_code_with_whether_it_is_fatal(operations: str) -> None:
    for code in ErrorCode:
        row = re.search(rf"^\| `{code.value}` \| (yes|no)\b", operations, re.MULTILINE)
        assert row is not None, f"no row for error code {code.value!r}"
        assert (row.group(1) == "yes") == (code in FATAL_CODES), code.value


# -- the README ------------------------------------------------------------------------------


def _fenced_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]


def test_readme_opens_with_the_install_and_run_then_the_install_and_test_commands(
    readme: str,
) -> None:
    assert _fenced_blocks(readme)[:2] == [INSTALL_AND_RUN, INSTALL_AND_TEST]


def test_readme_mentions_only_subcommands_the_cli_has(readme: str) -> None:
    code = "\n".join(_fenced_blocks(readme) + re.findall(r"`([^`\n]+)`", readme))
    mentioned = set(re.findall(r"\bsecuremsg ([a-z][a-z0-9-]*)", code))
    assert {"server", "certs", "client"} <= mentioned
    known = set(_subcommands())
    assert not mentioned - known, f"the README names unknown subcommands {mentioned - known}"


def test_readme_links_to_the_operations_and_protocol_docs(readme: str) -> None:
    for target in ("docs/operations.md", "docs/protocol.md"):
        assert f"]({target})" in readme
        assert (ROOT / target).is_file()


if __name__ == "__main__":
    print("### Server: `[server]`, `securemsg server`\n")
    print(option_table(ServerConfig))
    print("\n### Client: `[client]`, `securemsg client`, `send` and `listen`\n")
    print(option_table(ClientConfig))


def test_operations_doc_names_the_protocol_version_hello_must_carry(operations: str) -> None:
    from securemsg.core.messages import PROTOCOL_VERSION

    row = next(line for line in operations.splitlines() if line.startswith("| `unsupported_v"))
    assert f"is not {PROTOCOL_VERSION} " in row, row
