"""Fault injection for tests: a loopback TCP proxy that misbehaves on command, and a server
in a subprocess that can be paused, killed and restarted on the same port.

Everything binds to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FaultProxy",
    "ServerProcess",
    "paused_gc",
    "peak_rss",
    "record_figure",
    "wait_until",
]


class _Link:
    """One proxied connection: the client side and the upstream side."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.tasks = [
            asyncio.ensure_future(self._pump(client[0], upstream[1], "up")),
            asyncio.ensure_future(self._pump(upstream[0], client[1], "down")),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        proxy = self.proxy
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if proxy.blackholed:
                    proxy.dropped_bytes += len(data)
                    continue
                if proxy.latency:
                    await asyncio.sleep(proxy.latency)
                if proxy.bandwidth:
                    await asyncio.sleep(len(data) / proxy.bandwidth)
                writer.write(data)
                proxy.bytes[direction] += len(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not proxy.blackholed:
                self.close(rst=False)

    def close(self, *, rst: bool) -> None:
        for _, writer in (self.client, self.upstream):
            transport = writer.transport
            if transport.is_closing():
                continue
            if rst:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                transport.abort()
            else:
                transport.close()
        self.proxy.links.discard(self)


class FaultProxy:
    """``async with FaultProxy(port) as proxy:`` clients connect to ``proxy.port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.links: set[_Link] = set()
        self.blackholed = False
        self.refusing = False
        self.latency = 0.0
        self.bandwidth = 0.0
        self.connections = 0
        self.cuts = 0
        self.dropped_bytes = 0
        self.bytes = {"up": 0, "down": 0}
        self._server: asyncio.Server | None = None
        self._closed = False
        self.port = 0

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close(rst=False)
            for task in link.tasks:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing or self._closed:
            writer.transport.abort()
            return
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        if self._closed:
            # The proxy closed while this connected upstream (a client reconnecting as its
            # test ends): nothing would close these, and the garbage collector would warn of
            # the open sockets in whichever test it happened to run in.
            upstream[1].transport.abort()
            writer.transport.abort()
            return
        self.connections += 1
        self.links.add(_Link(self, (reader, writer), upstream))

    # -- commands -----------------------------------------------------------------------------

    def cut(self, *, rst: bool = True) -> int:
        """Close every proxied connection (RST or FIN); new connections still pass."""
        links = list(self.links)
        for link in links:
            link.close(rst=rst)
        self.cuts += 1
        return len(links)

    def blackhole(self, on: bool = True) -> None:
        """Keep every socket open but forward nothing: a half-open link."""
        self.blackholed = on

    def refuse(self, on: bool = True) -> None:
        self.refusing = on

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds

    def throttle(self, bytes_per_second: float) -> None:
        self.bandwidth = bytes_per_second


#: The stderr files of every server this process started, removed when it exits (not at
#: kill: tests read a server's log after stopping it).
_SERVER_LOGS: list[Path] = []


@atexit.register
def _remove_server_logs() -> None:
    for path in _SERVER_LOGS:
        path.unlink(missing_ok=True)


class ServerProcess:
    """``securemsg server`` in a subprocess, with JSON logs read from its stderr (a file in
    the temporary directory, removed when the test process exits)."""

    def __init__(self, args: Sequence[str], *, port: int = 0, cwd: Path | None = None) -> None:
        self.args = list(args)
        self.port = port
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path: Path | None = None
        self.restarts = 0

    def start(self, timeout: float = 15.0) -> int:
        import tempfile

        handle = tempfile.NamedTemporaryFile(
            prefix="securemsg-server-", suffix=".log", delete=False
        )
        self.stderr_path = Path(handle.name)
        _SERVER_LOGS.append(self.stderr_path)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "securemsg",
                "server",
                "--log-format",
                "json",
                "--port",
                str(self.port),
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=handle,
            cwd=self.cwd,
            env=env,
        )
        handle.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == "server_listening":
                    self.port = int(event["port"])
                    return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not log server_listening in {timeout} s")

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def log_text(self) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout: float = 15.0) -> int:
        """Kill and start again on the same port."""
        self.kill()
        self.restarts += 1
        return self.start(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code (killed if it does not stop in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


# -- figures -----------------------------------------------------------------------------------


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No garbage collection in this (the test's) process while the block runs.

    For tests that time a server in another process from here: a full collection of
    pytest's heap (the whole suite's modules) stalled this process's event loop for 20-40 ms
    here (seen with ``gc.callbacks``), which the test would count as the server's; the
    likely cause of one 155 ms stall, and a p99 of 109 ms, on a slow CI machine.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def record_figure(case: str, **values: Any) -> dict[str, Any]:
    """Print one measured figure of a chaos or bad-input test, and append it as a JSON line to
    the file named by ``SECUREMSG_FIGURES`` when set (``docs/reliability.md`` is made from it).
    """
    figure = {"case": case, **values}
    line = json.dumps(figure, sort_keys=False, default=str)
    print(f"FIGURE {line}")
    target = os.environ.get("SECUREMSG_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return figure


def peak_rss(pid: int) -> int:
    """The peak resident set size (``VmHWM``) of a process, in bytes (Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


async def wait_until(
    condition: Callable[[], object], *, within: float, step: float = 0.01
) -> float:
    """Poll ``condition`` every ``step`` seconds until it holds; return the loop time it was
    seen to hold. Raises ``TimeoutError`` after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        while True:
            if condition():
                return loop.time()
            await asyncio.sleep(step)
