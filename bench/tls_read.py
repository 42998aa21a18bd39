"""CPU per read of the server's TLS layer: one 150-byte record per ``buffer_updated``.

    python bench/tls_read.py

:class:`securemsg.server.tlstransport.TLSTransport` between a fake TCP transport and a
fake application, after a real handshake with securemsg's contexts (a fresh development
PKI); 20,000 records, ``time.process_time``, 7 runs, their median. The cost of TLS on a
read, without sockets and without the application's work.
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import tempfile
import time
from typing import Any

from securemsg.core.readbuffer import read_buffer
from securemsg.server.tlstransport import TLSTransport
from securemsg.tls.contexts import client_context, server_context
from securemsg.tls.devcerts import make_dev_pki


class FakeTCP(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


class App(asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        pass


async def one_run(server: ssl.SSLContext, client: ssl.SSLContext) -> float:
    tls = TLSTransport(asyncio.get_running_loop(), server, App())
    tcp = FakeTCP()
    tls.connection_made(tcp)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    buffer = read_buffer()

    def feed(data: bytes) -> None:
        buffer[: len(data)] = data
        tls.buffer_updated(len(data))

    for _ in range(6):  # the handshake: two flights each way
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if data := outgoing.read():
            feed(data)
        for data in tcp.written:
            incoming.write(data)
        tcp.written.clear()
    records = []
    for _ in range(20_000):
        peer.write(b"y" * 150)
        records.append(outgoing.read())
    started = time.process_time()
    for record in records:
        feed(record)
    return (time.process_time() - started) / len(records) * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_dev_pki(tmp, hosts=("localhost",))
        server = server_context(cert=pki.server_cert, key=pki.server_key)
        client = client_context(ca=pki.ca)
    runs = [asyncio.run(one_run(server, client)) for _ in range(7)]
    cells = ", ".join(f"{run:.2f}" for run in runs)
    print(f"server TLS layer, us per 150-byte record read: {statistics.median(runs):.2f} ({cells})")


if __name__ == "__main__":
    main()
