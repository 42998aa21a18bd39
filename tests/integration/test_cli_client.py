"""The ``securemsg client``, ``send`` and ``listen`` commands and the examples, run as real
processes against a server on 127.0.0.1 over TLS.

The server runs in the test's event loop, so every process is driven with asyncio
(``create_subprocess_exec``, a pty read with ``add_reader``) and every wait is bounded; the
``run`` fixture kills whatever is still running at the end. A library client (``probe``)
plays the other side and checks readiness with ``who`` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import json
import os
import pty
import re
import socket
import struct
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from securemsg.cli.client_common import default_name
from securemsg.client.client import Client, connect
from securemsg.core.messages import NAME_PATTERN
from tests.integration.conftest import StartServer

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
#: Seconds any one process or expected output may take; stretched on slow machines.
WAIT = 10.0 * float(os.environ.get("SECUREMSG_TEST_TIMESCALE", "1"))
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")

Process = asyncio.subprocess.Process
PIPE = asyncio.subprocess.PIPE


def _env(**extra: str) -> dict[str, str]:
    """The environment without the user's securemsg settings (but the test knobs), plus
    ``extra``."""
    keep = {"SECUREMSG_TEST_TIMESCALE", "SECUREMSG_NO_UVLOOP"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECUREMSG_") or k in keep}
    return env | extra


class Processes:
    """Starts processes with stdin from /dev/null and stdout and stderr piped (unless told
    otherwise); :meth:`kill_all` ends what is still running."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    async def securemsg(self, *args: str, **options: Any) -> Process:
        """``python -m securemsg ARGS...``"""
        return await self._start("-m", "securemsg", *args, **options)

    async def example(self, name: str, *args: str, **options: Any) -> Process:
        """``python examples/NAME ARGS...``"""
        return await self._start(str(EXAMPLES / name), *args, **options)

    async def _start(self, *args: str, **options: Any) -> Process:
        options = {"stdin": asyncio.subprocess.DEVNULL, "stdout": PIPE, "stderr": PIPE} | options
        options.setdefault("env", _env())
        process = await asyncio.create_subprocess_exec(sys.executable, *args, cwd=ROOT, **options)
        self.started.append(process)
        return process

    async def kill_all(self) -> None:
        for process in self.started:
            if process.returncode is None:
                process.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.communicate(), WAIT)


@pytest.fixture
async def run() -> AsyncIterator[Processes]:
    processes = Processes()
    yield processes
    await processes.kill_all()


@pytest.fixture
async def server(start_server: StartServer) -> Any:
    return await start_server()


@pytest.fixture
async def probe(server: Any, tls_files: Any) -> AsyncIterator[Client]:
    """A library client called ``probe`` on the test server."""
    async with connect("127.0.0.1", server.port, ca=str(tls_files.ca_pem), name="probe") as client:
        yield client


def _address(server: Any) -> str:
    return f"127.0.0.1:{server.port}"


async def _members(client: Client, room: str, names: set[str]) -> None:
    """Wait until ``names`` are all in ``room``."""
    async with asyncio.timeout(WAIT):
        while not names <= set(await client.who(room)):  # noqa: ASYNC110 - polling the server
            await asyncio.sleep(0.02)


async def _finish(process: Process, stdin: bytes | None = None) -> tuple[str, str]:
    out, err = await asyncio.wait_for(process.communicate(stdin), WAIT)
    return out.decode(), err.decode()


async def _line(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), WAIT)
    assert line, "the process closed its output"
    return line.decode().rstrip("\n")


# -- send and listen ----------------------------------------------------------------------------


async def test_listen_prints_what_send_sends_as_json_lines_and_exits_after_count(
    run: Processes, server: Any, probe: Client, tls_files: Any
) -> None:
    ca, where = ["--ca", str(tls_files.ca_pem)], _address(server)
    listen = "listen --name ears --room news --count 3 --json".split()
    listener = await run.securemsg(*listen, *ca, where)
    await _members(probe, "news", {"ears"})
    for body in ['{"n": 1}', "plain words", "42"]:
        sender = await run.securemsg("send", "--name", "mouth", "--room", "news", *ca, where, body)
        out, err = await _finish(sender)
        assert sender.returncode == 0, err
        assert out == ""
    out, err = await _finish(listener)
    assert listener.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["body"] for r in records] == [{"n": 1}, "plain words", 42]
    assert {(r["room"], r["from"], r["to"]) for r in records} == {("news", "mouth", None)}
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert all(isinstance(r["ts"], float) for r in records)


async def test_send_to_a_name_delivers_a_direct_and_an_unknown_name_is_one_sentence(
    run: Processes, server: Any, probe: Client, tls_files: Any
) -> None:
    ca, where = ["--ca", str(tls_files.ca_pem)], _address(server)
    sender = await run.securemsg("send", *ca, "--to", "probe", where, "psst")
    _, err = await _finish(sender)
    assert sender.returncode == 0, err
    message = await probe.receive(timeout=WAIT)
    assert (message.room, message.to, message.body) == (None, "probe", "psst")

    sender = await run.securemsg("send", *ca, "--to", "nobody", where, "hello?")
    _, err = await _finish(sender)
    assert sender.returncode != 0
    assert err.strip() == f"securemsg: nobody called 'nobody' is connected to {where}"


async def test_name_defaults_to_the_certificate_identity_under_mutual_tls(
    run: Processes, start_server: StartServer, tls_files: Any
) -> None:
    ca = str(tls_files.ca_pem)
    server = await start_server(ca=ca, require_client_cert=True)
    bob_cert, bob_key = str(tls_files.bob_cert), str(tls_files.bob_key)
    async with connect("127.0.0.1", server.port, ca=ca, cert=bob_cert, key=bob_key) as bob:
        alice_tls = ["--cert", str(tls_files.alice_cert), "--key", str(tls_files.alice_key)]
        sender = await run.securemsg(
            "send", "--ca", ca, *alice_tls, "--to", "bob", _address(server), "hi bob"
        )
        _, err = await _finish(sender)
        assert sender.returncode == 0, err
        message = await bob.receive(timeout=WAIT)
        assert (message.sender, message.body) == ("alice", "hi bob")


def test_default_name_is_the_user_name_made_valid_plus_a_random_suffix(
    monkeypatch: pytest.MonkeyPatch, tls_files: Any
) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "Jo Smith/ü")
    first, second = default_name(), default_name()
    assert first != second
    for name in (first, second):
        assert re.match(NAME_PATTERN, name) and name.startswith("Jo_Smith-")
    assert default_name(str(tls_files.alice_cert)) == "alice"


# -- client without a terminal ------------------------------------------------------------------


async def test_two_piped_clients_chat_through_stdin_and_stdout_and_exit_0_at_eof(
    run: Processes, server: Any, probe: Client, tls_files: Any
) -> None:
    ca, where = ["--ca", str(tls_files.ca_pem)], _address(server)
    ann = await run.securemsg("client", "--name", "ann", "--room", "den", *ca, where, stdin=PIPE)
    ben = await run.securemsg(
        "client", "--name", "ben", "--room", "den", "--json", *ca, where, stdin=PIPE
    )
    await _members(probe, "den", {"ann", "ben"})
    assert ann.stdin is not None and ben.stdin is not None

    ann.stdin.write(b"hello ben\n\nsecond \x1b[31mline\n")
    await ann.stdin.drain()
    first, second = json.loads(await _line(ben.stdout)), json.loads(await _line(ben.stdout))
    assert (first["room"], first["from"], first["body"]) == ("den", "ann", "hello ben")
    assert second["body"] == "second \x1b[31mline"  # JSON keeps the text exactly

    ben.stdin.write(b"hi ann\r\nbye\x1b]0;owned\x07")  # CRLF; a last line without a newline
    ben.stdin.close()
    assert await _line(ann.stdout) == "[den] ben: hi ann"
    assert await _line(ann.stdout) == "[den] ben: bye\\x1b]0;owned\\x07"  # escaped for a tty
    _, err = await _finish(ben)
    assert ben.returncode == 0, err

    out, err = await _finish(ann, b"")
    assert ann.returncode == 0, err
    assert out == ""


async def test_piped_client_with_a_line_over_the_limit_says_so_in_one_sentence(
    run: Processes, start_server: StartServer, tls_files: Any
) -> None:
    small = await start_server(max_frame=1000)
    ca, where = ["--ca", str(tls_files.ca_pem)], _address(small)
    process = await run.securemsg("client", "--room", "r", *ca, where, stdin=PIPE)
    _, err = await _finish(process, b"fine\n" + b"y" * 2000 + b"\nnot reached\n")
    assert process.returncode == 1
    assert err.startswith("securemsg: stdin line 2 not sent: the message of"), err
    assert len(err.strip().splitlines()) == 1, err


async def test_listen_says_when_messages_may_be_missing_and_json_goes_on_after_a_restart(
    run: Processes, start_server: StartServer, tls_files: Any, unit: float
) -> None:
    server = await start_server()
    port, ca = server.port, ["--ca", str(tls_files.ca_pem)]
    fast = ["--reconnect-base", str(unit), "--reconnect-cap", str(4 * unit)]
    listen = ["listen", "--name", "ears", "--room", "news", "--json", *fast, *ca]
    listener = await run.securemsg(*listen, _address(server), "--log-level", "error")

    async def say(text: str) -> None:
        async with connect("127.0.0.1", port, ca=str(tls_files.ca_pem), name="mouth") as mouth:
            await _members(mouth, "news", {"ears"})
            await mouth.publish("news", text, confirm=True, timeout=WAIT)

    await say("before")
    assert json.loads(await _line(listener.stdout))["body"] == "before"
    await server.close()
    await start_server(port=port)
    await say("after")
    gap = json.loads(await _line(listener.stdout))
    assert set(gap) == {"gap"} and gap["gap"]["missing"] is None
    assert json.loads(await _line(listener.stdout))["body"] == "after"
    listener.kill()
    _, err = await _finish(listener)
    assert "messages sent meanwhile may be missing" in err


async def test_piped_client_without_a_room_says_so(
    run: Processes, server: Any, tls_files: Any
) -> None:
    process = await run.securemsg("client", "--ca", str(tls_files.ca_pem), _address(server))
    _, err = await _finish(process)
    assert process.returncode != 0
    assert "--room" in err and len(err.strip().splitlines()) == 1


# -- client on a terminal -----------------------------------------------------------------------


class Terminal:
    """The master side of a pseudo-terminal: what the program wrote, without escapes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.raw = b""
        self._grew = asyncio.Event()
        self._closed = False
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the program closed its side
            data = b""
        if not data:
            self._eof()
        self.raw += data
        self._grew.set()

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw.decode(errors="replace")).replace("\r", "")

    async def expect(self, needle: str) -> None:
        async with asyncio.timeout(WAIT):
            while needle not in self.text:
                if self._closed:
                    raise AssertionError(f"{needle!r} never showed up in:\n{self.text}")
                self._grew.clear()
                await self._grew.wait()

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def _eof(self) -> None:
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().remove_reader(self.fd)
            self._grew.set()

    def close(self) -> None:
        self._eof()
        with contextlib.suppress(OSError):
            os.close(self.fd)


async def _on_terminal(run: Processes, *args: str) -> tuple[Process, Terminal]:
    """``securemsg ARGS...`` with a pseudo-terminal (100 x 24) as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = _env(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    tty = {"stdin": slave, "stdout": slave, "stderr": slave}
    try:
        process = await run.securemsg(*args, **tty, env=env, start_new_session=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return process, Terminal(master)


async def test_interactive_client_on_a_terminal_chats_and_quits(
    run: Processes, server: Any, start_server: StartServer, probe: Client, tls_files: Any
) -> None:
    await probe.join("lobby")
    ca, where = str(tls_files.ca_pem), _address(server)
    args = "client --name tty --room lobby --reconnect-base 0.1".split()
    process, terminal = await _on_terminal(run, *args, "--ca", ca, where)
    try:
        await terminal.expect("connected as tty; in lobby")
        await terminal.expect("tty@lobby>")

        terminal.type("hello from the terminal\r")
        message = await probe.receive(timeout=WAIT)
        assert (message.room, message.sender) == ("lobby", "tty")
        assert message.body == "hello from the terminal"

        terminal.type("half-typed")  # incoming lines must not eat what is being typed
        await terminal.expect("half-typed")
        await probe.publish("lobby", "ping from the probe")
        await terminal.expect("[lobby] probe: ping from the probe")
        terminal.type(" line\r")
        message = await probe.receive(timeout=WAIT)
        assert message.body == "half-typed line"

        async with connect("127.0.0.1", server.port, ca=ca, name="zoe") as zoe:
            await zoe.join("lobby")
            await terminal.expect("zoe joined lobby")
            terminal.type("/who\r")
            await terminal.expect("in lobby: probe, tty, zoe")
            terminal.type("/msg zoe just for you\r")
            direct = await zoe.receive(timeout=WAIT)
            assert (direct.room, direct.to, direct.body) == (None, "zoe", "just for you")
        await terminal.expect("zoe left lobby")

        terminal.type("/msg nobody hi\r")
        await terminal.expect("nobody called nobody is connected")

        port = server.port  # a restart loses the session: the chat says so, then goes on
        await server.close()
        await terminal.expect("connection lost (")
        await terminal.expect("retrying in")
        await start_server(port=port)
        await terminal.expect("reconnected: session expired, messages may be missing")
        await _members(probe, "lobby", {"probe", "tty"})
        terminal.type("still here\r")
        message = await probe.receive(timeout=WAIT)
        assert (message.sender, message.body) == ("tty", "still here")

        terminal.type("/quit\r")
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
        assert "Traceback" not in terminal.text
    finally:
        terminal.close()


async def test_interactive_client_ends_in_one_sentence_when_it_gives_up(
    run: Processes, server: Any, tls_files: Any
) -> None:
    args = "client --max-attempts 1 --reconnect-base 0.05 --room lobby".split()
    process, terminal = await _on_terminal(
        run, *args, "--ca", str(tls_files.ca_pem), _address(server)
    )
    try:
        await terminal.expect("@lobby>")
        terminal.type("half a thought")
        await server.close()
        assert await asyncio.wait_for(process.wait(), WAIT) == 1
        await terminal.expect("securemsg: gave up after 1 reconnect attempts")
        assert "Traceback" not in terminal.text
    finally:
        terminal.close()


# -- mistakes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wrong_name_server(start_server: StartServer, tls_files: Any, tmp_path: Path) -> str:
    """A server whose certificate is valid for example.org only."""
    leaf = tls_files.ca.issue_cert("example.org")
    cert, key = tmp_path / "example.pem", tmp_path / "example.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return _address(await start_server(cert=str(cert), key=str(key)))


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        ("nothing_listening", "connection refused"),
        ("wrong_ca", "is not signed by the CA in"),
        ("missing_ca_file", "missing.pem (--ca) does not exist"),
        ("host_name_mismatch", "is not valid for the name '127.0.0.1'"),
        ("host_name_mismatch", "it holds 'example.org': connect with one of those"),
        (
            "over_the_limit",
            "not sent: the message of 2051 bytes exceeds the server's max_frame of 1000",
        ),
        ("name_taken", "'probe' is in use; choose another with --name"),
        ("invalid_room", "--room 'no spaces': a room name is"),
    ],
)
async def test_user_mistakes_end_in_one_sentence_and_a_nonzero_exit(
    run: Processes,
    server: Any,
    start_server: StartServer,
    probe: Client,
    tls_files: Any,
    tmp_path: Path,
    mistake: str,
    expected: str,
) -> None:
    ca, where, room = str(tls_files.ca_pem), _address(server), "news"
    args = ["send", "--name", "sender"]
    if mistake == "nothing_listening":
        where = f"127.0.0.1:{_free_port()}"
    elif mistake == "wrong_ca":
        ca, args = str(tls_files.other_ca_pem), ["listen"]
    elif mistake == "missing_ca_file":
        ca, args = str(tmp_path / "missing.pem"), ["client"]
    elif mistake == "host_name_mismatch":
        where = await _wrong_name_server(start_server, tls_files, tmp_path)
    elif mistake == "name_taken":
        args = ["send", "--name", "probe"]
    elif mistake == "invalid_room":
        room = "no spaces"
    elif mistake == "over_the_limit":
        where = _address(await start_server(max_frame=1000))
    message = ["hello"] if args[0] == "send" else []
    if mistake == "over_the_limit":
        message = ["y" * 2000]
    process = await run.securemsg(*args, "--ca", ca, "--room", room, where, *message)
    out, err = await _finish(process)
    assert process.returncode not in (0, None)
    assert out == ""
    assert err.startswith("securemsg: ") and expected in err
    assert len(err.strip().splitlines()) == 1, err  # one sentence, no traceback


# -- examples -----------------------------------------------------------------------------------


def _example_args(server: Any, tls_files: Any) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(server.port), "--ca", str(tls_files.ca_pem)]


async def test_chat_example_sends_lines_and_prints_messages(
    run: Processes, server: Any, probe: Client, tls_files: Any
) -> None:
    await probe.join("lobby")
    options = [*_example_args(server, tls_files), "--name", "example", "--duration", str(WAIT)]
    chat = await run.example("chat.py", *options, stdin=PIPE)
    assert (await _line(chat.stdout)).startswith("joined lobby as example")
    assert chat.stdin is not None
    chat.stdin.write(b"hi from the example\n")
    await chat.stdin.drain()
    assert (await probe.receive(timeout=WAIT)).body == "hi from the example"
    await probe.publish("lobby", "hi back")
    assert await _line(chat.stdout) == "probe: hi back"
    _, err = await _finish(chat, b"")
    assert chat.returncode == 0, err


async def test_request_reply_example_answers_its_requests(
    run: Processes, server: Any, tls_files: Any
) -> None:
    options = [*_example_args(server, tls_files), "--count", "3"]
    process = await run.example("request_reply.py", *options)
    out, err = await _finish(process)
    assert process.returncode == 0, err
    assert "1 + 1 = 2" in out and "3 + 9 = 12" in out


async def test_telemetry_example_publishes_numbered_readings_in_order(
    run: Processes, server: Any, probe: Client, tls_files: Any
) -> None:
    await probe.join("telemetry.>")
    options = [*_example_args(server, tls_files), "--count", "50"]
    process = await run.example("telemetry.py", *options)
    out, err = await _finish(process)
    assert process.returncode == 0, err
    assert "published 50 readings to telemetry.sensor-1" in out
    numbers = [(await probe.receive(timeout=WAIT)).body["n"] for _ in range(50)]
    assert numbers == list(range(1, 51))
