"""What TLS 1.3 session resumption saves the server, OpenSSL alone: no sockets, no loop.

    python bench/tls_resumption.py [--count N] [--rounds R]

A server and a client ``SSLObject`` over memory BIOs, with securemsg's own contexts
(``server_context(session_tickets=1)``, ``client_context``: TLS 1.3, P-256 key share), hand
each other their flights until both are done; only the server's calls are timed
(``time.process_time``, so other processes on the machine do not count). Per certificate
type (ECDSA P-256, as the development PKI and trustme make; RSA 2048, as many public CAs
issue) it measures a full handshake, a resumed one (the client offers the ticket of its
previous connection: PSK with (EC)DHE, the only mode OpenSSL accepts by default), a full
handshake that issues a ticket (the price of ``tls_session_tickets`` for a client that
never resumes), and one where the client offers a ticket that a restarted server (a new
context with the same certificate) refuses before it makes a full handshake and issues a
new ticket: the reconnect storm after a restart. Rounds interleave the cases; the figure
is the median of the rounds.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import trustme

from securemsg.tls.contexts import client_context, server_context


def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    session: ssl.SSLSession | None,
) -> tuple[float, ssl.SSLSession | None, bool]:
    """One handshake; returns (server CPU seconds, the client's session, resumed?)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    spent = 0.0
    started = time.process_time()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    spent += time.process_time() - started
    client_done = server_done = False
    for _ in range(10):  # a TLS 1.3 handshake is done in two flights each way
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            started = time.process_time()
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            spent += time.process_time() - started
        c_in.write(s_out.read())
        if client_done and server_done:
            break
    # The tickets come after the server's handshake: the client reads them with the data.
    started = time.process_time()
    server.write(b"x")
    spent += time.process_time() - started
    c_in.write(s_out.read())
    client.read(1)
    return spent, client.session, server.session_reused


def _contexts(directory: Path, key_type: trustme.KeyType) -> tuple[ssl.SSLContext, ...]:
    ca = trustme.CA(key_type=key_type)
    leaf = ca.issue_cert("localhost", key_type=key_type)
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert, key = directory / "cert.pem", directory / "key.pem"
    no_tickets = server_context(cert=cert, key=key)
    tickets = server_context(cert=cert, key=key, session_tickets=1)
    # The same server after a restart: same certificate, a new ticket key.
    restarted = server_context(cert=cert, key=key, session_tickets=1)
    return no_tickets, tickets, restarted, client_context(ca=directory / "ca.pem")


def measure(key_type: trustme.KeyType, *, count: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        no_tickets, tickets, restarted, client = _contexts(Path(tmp), key_type)
    cases: dict[str, list[float]] = {
        "full": [],
        "full + ticket": [],
        "resumed": [],
        "old ticket refused": [],
    }
    _, session, _ = _handshake(tickets, client, None)
    for _ in range(rounds):
        spent = 0.0
        for _ in range(count):
            cpu, _, resumed = _handshake(restarted, client, session)
            assert not resumed, "a new ticket key accepted an old ticket"
            spent += cpu
        cases["old ticket refused"].append(spent / count)
        spent = sum(_handshake(no_tickets, client, None)[0] for _ in range(count))
        cases["full"].append(spent / count)
        spent = sum(_handshake(tickets, client, None)[0] for _ in range(count))
        cases["full + ticket"].append(spent / count)
        spent = 0.0
        for _ in range(count):
            cpu, session, resumed = _handshake(tickets, client, session)
            assert resumed, "the server did not resume the session"
            spent += cpu
        cases["resumed"].append(spent / count)
    return {name: statistics.median(values) * 1e6 for name, values in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="handshakes per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{ssl.OPENSSL_VERSION}; server CPU per handshake, median of {args.rounds} rounds")
    for key_type in (trustme.KeyType.ECDSA, trustme.KeyType.RSA):
        figures = measure(key_type, count=args.count, rounds=args.rounds)
        cells = ", ".join(f"{name} {value:.0f} us" for name, value in figures.items())
        saved = 1 - figures["resumed"] / figures["full"]
        print(f"{key_type.name:5}: {cells}; resumed saves {saved:.0%}")


if __name__ == "__main__":
    main()
