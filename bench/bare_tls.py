"""The floor under the handshake target: server CPU per TLS handshake of a bare uvloop
TLS echo server (accept, handshake, echo one byte, close), with securemsg's own server and
client contexts and development certificates (ECDSA P-256, TLS 1.3, an X25519 key share:
no HelloRetryRequest).

    python bench/bare_tls.py [COUNT]   (after 200 to warm up)

Compare with ``securemsg bench handshakes --local``: the difference is what securemsg adds
per connection (ClientHello peek, hello/welcome/bye, session, logging).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

CONCURRENCY = 8
WARM_UP = 200


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(directory: str, port: int) -> None:
    from securemsg.tls.contexts import server_context

    context = server_context(cert=f"{directory}/server.pem", key=f"{directory}/server.key")
    loop = asyncio.get_running_loop()
    await loop.create_server(Echo, "127.0.0.1", port, ssl=context, backlog=1024)
    await asyncio.Future()


async def drive(directory: str, port: int, pid: int, count: int) -> None:
    from securemsg.tls.contexts import client_context

    context = client_context(ca=f"{directory}/ca.pem")
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
            )
            writer.write(b"x")
            await reader.read(1)
            writer.close()
            await writer.wait_closed()

    # Warm up first, as `securemsg bench handshakes` runs are measured: the server's first
    # connections pay for imports and caches that no later one does.
    await asyncio.gather(*(one() for _ in range(WARM_UP)))
    cpu, start = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    took, used = time.perf_counter() - start, cpu_seconds(pid) - cpu
    print(f"bare uvloop TLS server: {count / took:,.0f} handshakes/s,")
    print(f"server CPU {used / count * 1e6:,.0f} µs per handshake ({count:,} handshakes)")


def main() -> None:
    from securemsg.runner import run

    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        run(serve(sys.argv[2], int(sys.argv[3])))
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    from securemsg.tls.devcerts import make_dev_pki

    with tempfile.TemporaryDirectory() as directory:
        make_dev_pki(directory, hosts=("localhost", "127.0.0.1"))
        port = _free_port()
        server = subprocess.Popen([sys.executable, __file__, "serve", directory, str(port)])
        try:
            time.sleep(1.5)
            run(drive(directory, port, server.pid, count))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
