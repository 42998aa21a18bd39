"""A local ``securemsg server`` for ``securemsg bench --local``: a subprocess on a fresh
development PKI and a free port, so the server and the clients each get a core."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from securemsg.errors import SecureMsgError

__all__ = ["LocalServer"]

#: Logged by the readiness probe (a TCP connect without TLS), not by the benchmark.
_PROBE: tuple[str, str] = ("tls_handshake_failed", "eof")


class LocalServer:
    """``securemsg server`` in a subprocess on a fresh development PKI and a free port."""

    def __init__(
        self,
        *,
        max_connections: int = 10_000,
        loop: str | None = None,
        directory: str | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.loop = loop
        self.host = "127.0.0.1"
        self.port = 0
        self.ca = ""
        self.pid = 0
        #: Where the PKI and the server log live (a temporary directory when None).
        self.directory = directory or ""
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> LocalServer:
        from securemsg.tls.devcerts import make_dev_pki

        if not self.directory:
            self._tmp = tempfile.TemporaryDirectory(prefix="securemsg-bench-")
            self.directory = self._tmp.name
        pki = make_dev_pki(self.directory, hosts=("localhost", "127.0.0.1"))
        self.ca = str(pki.ca)
        self.port = _free_port(self.host)
        env = dict(os.environ)
        if self.loop == "asyncio":
            env["SECUREMSG_NO_UVLOOP"] = "1"
        argv = [sys.executable, "-m", "securemsg", "server", "--cert", str(pki.server_cert)]
        argv += ["--key", str(pki.server_key), "--host", self.host, "--port", str(self.port)]
        argv += ["--max-connections", str(self.max_connections), "--log-level", "warning"]
        argv += ["--log-format", "json"]
        self._process = _spawn(argv, Path(self.directory, "server.log"), env)
        self.pid = self._process.pid
        await self._wait_listening()
        return self

    async def _wait_listening(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SecureMsgError(f"the local server exited: {self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if time.monotonic() > end:
                    raise SecureMsgError("the local server did not start listening") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def warnings(self) -> dict[str, int]:
        """How many times the server logged each warning or error event so far (a session
        the server ended, a slow consumer cut: the causes of a run's loss)."""
        path = Path(self.directory, "server.log")
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            return {}
        counts: collections.Counter[str] = collections.Counter()
        for line in lines:
            try:
                entry = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if not isinstance(entry, dict) or entry.get("level") not in ("warning", "error"):
                continue
            if (entry.get("event"), entry.get("reason")) != _PROBE:
                counts[str(entry.get("event"))] += 1
        return dict(counts)

    def log_tail(self) -> str:
        path = Path(self.directory, "server.log")
        try:
            return path.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    async def __aexit__(self, *exc_info: object) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._tmp is not None:
            self._tmp.cleanup()


def _spawn(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=log, env=env)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
