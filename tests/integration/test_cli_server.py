"""The ``securemsg server`` and ``securemsg certs`` commands, run as real processes."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.core.messages import Hello, Welcome, decode_server, encode
from securemsg.tls.contexts import client_context
from tests.faults import ServerProcess

pytestmark = pytest.mark.timeout(60)


def _server_args(tls_files: Any) -> list[str]:
    return ["--cert", str(tls_files.server_cert), "--key", str(tls_files.server_key)]


def _hello(port: int, ca: Path, name: str = "cli-test") -> Welcome:
    import socket

    ctx = client_context(ca=ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(encode_frame(encode(Hello(version=2, name=name))))
        decoder = FrameDecoder()
        while True:
            data = sock.recv(65536)
            if not data:
                raise EOFError("the server closed the connection before welcome")
            frames = decoder.feed(data)
            if frames:
                message = decode_server(frames[0])
                assert isinstance(message, Welcome)
                return message


def test_server_starts_on_port_0_logs_the_port_and_stops_on_sigterm(tls_files: Any) -> None:
    server = ServerProcess(_server_args(tls_files))
    port = server.start()
    try:
        assert port > 0
        listening = next(e for e in server.events() if e["event"] == "server_listening")
        assert listening["client_certs_required"] is False
        assert _hello(port, tls_files.ca_pem).name == "cli-test"
    finally:
        code = server.stop()
    assert code == 0
    events = [e["event"] for e in server.events()]
    assert "server_stopping" in events and "server_stopped" in events


def test_sigint_also_stops_gracefully(tls_files: Any) -> None:
    server = ServerProcess(_server_args(tls_files))
    server.start()
    server.signal(signal.SIGINT)
    assert server.proc is not None
    assert server.proc.wait(15) == 0


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "securemsg", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--cert", "missing.pem", "--key", "missing.key"], {}, "missing.pem"),
        (["--config", "nope.toml"], {}, "nope.toml"),
        (["--heartbeat-interval", "5", "--heartbeat-timeout", "1"], {}, "heartbeat_timeout"),
        ([], {"SECUREMSG_PORT": "abc"}, "SECUREMSG_PORT"),
    ],
)
def test_user_mistakes_end_in_one_sentence_and_a_nonzero_exit(
    tls_files: Any, tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    base = [] if "--cert" in args else _server_args(tls_files)
    result = _run("server", "--port", "0", *base, *args, cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert needle in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_port_in_use_is_one_sentence(tls_files: Any) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("server", "--port", str(port), *_server_args(tls_files))
    assert result.returncode != 0
    assert "already in use" in result.stderr and "Traceback" not in result.stderr


def test_dev_flag_makes_certificates_and_serves_with_them(tmp_path: Path) -> None:
    server = ServerProcess(["--dev"], cwd=tmp_path)
    port = server.start(timeout=30)
    try:
        assert (tmp_path / "certs" / "ca.pem").exists()
        assert _hello(port, tmp_path / "certs" / "ca.pem").name == "cli-test"
    finally:
        assert server.stop() == 0


def test_certs_command_writes_a_usable_pki(tmp_path: Path) -> None:
    result = _run("certs", "--dir", str(tmp_path / "pki"), "--client", "alice")
    assert result.returncode == 0, result.stderr
    assert "development" in result.stdout.lower()
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "alice.pem", "alice.key"):
        assert (tmp_path / "pki" / name).exists()
    ctx = client_context(ca=tmp_path / "pki" / "ca.pem")
    assert isinstance(ctx, ssl.SSLContext)
