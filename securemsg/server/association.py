"""One DTLS association on the server: its pyOpenSSL connection (memory BIOs), its name
once ``hello`` was accepted, the numbering of what it is sent, and its publish budget.

The listener (:mod:`securemsg.server.datagram`) owns the socket and the clock; this class
turns the datagrams of one peer into plaintext frames and frames into datagrams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from OpenSSL import SSL

from securemsg.core.datagram import MAX_UDP_PAYLOAD, pack_datagrams, split_records
from securemsg.core.delivery import splice_frame
from securemsg.tls.dtls import dtls_peer_identity

__all__ = ["Association"]

#: Plaintext records read per incoming datagram: a datagram holds few records.
_RECORDS_PER_DATAGRAM: Final = 16
_BIO_CHUNK: Final = 65536
_BIO_READS: Final = 64


class Association:
    """The server's end of one DTLS association with ``peer``."""

    __slots__ = (
        "address",
        "conn",
        "established",
        "hello_random",
        "identity",
        "key",
        "name",
        "opened_at",
        "peer",
        "rate_stamp",
        "rate_tokens",
        "send",
        "seq",
    )

    def __init__(
        self,
        conn: SSL.Connection,
        *,
        address: tuple[str, int],
        key: bytes,
        send: Callable[[bytes, tuple[str, int]], None],
        now: float,
        hello_random: bytes = b"",
    ) -> None:
        self.conn = conn
        #: The random of the ClientHello that opened it: a late copy of that ClientHello is
        #: a retransmission, not a new handshake.
        self.hello_random = hello_random
        self.address = address
        self.peer = f"{address[0]}:{address[1]}"
        self.key = key
        self.send = send
        self.established = False
        self.identity: str | None = None
        self.name: str | None = None
        self.seq = 0
        self.opened_at = now
        self.rate_tokens = float("inf")  # a full burst at first (clamped on use)
        self.rate_stamp = now

    def __repr__(self) -> str:
        return f"Association({self.peer}, name={self.name!r})"

    # -- handshake ----------------------------------------------------------------------------

    def handshake(self) -> bool:
        """Go on with the handshake; True once it is done. :class:`SSL.Error` when it
        failed (an alert, if any, is sent first)."""
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            self.flush()
            return False
        except SSL.Error:
            self.flush()
            raise
        self.flush()
        self.established = True
        self.identity = dtls_peer_identity(self.conn)
        return True

    def on_timer(self) -> None:
        """Retransmit the last flight if its DTLS timer ran out."""
        if self.conn.DTLSv1_handle_timeout():
            self.flush()

    # -- records ------------------------------------------------------------------------------

    def receive(self, datagram: bytes) -> list[bytes]:
        """The plaintext frames ``datagram`` carried (records that fail to decrypt are
        dropped by OpenSSL, as DTLS wants). :class:`SSL.ZeroReturnError` on close_notify."""
        if datagram:
            self.conn.bio_write(datagram)
        frames: list[bytes] = []
        for _ in range(_RECORDS_PER_DATAGRAM):
            try:
                frames.append(self.conn.recv(_BIO_CHUNK))
            except SSL.WantReadError:
                break
        self.flush()  # a retransmitted final flight, an alert
        return frames

    def send_frame(self, frame: bytes) -> None:
        try:
            self.conn.send(frame)
        except SSL.Error:
            return  # closed or failed: the datagram is lost, as any datagram may be
        self.flush()

    def deliver(self, prefix: bytes) -> None:
        """One datagram ``message``: numbered for this association, so gaps show losses."""
        self.seq += 1
        self.send_frame(splice_frame(prefix, self.seq))

    def close(self) -> None:
        """Send close_notify (best effort)."""
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        self.flush()

    def flush(self) -> None:
        data = b""
        for _ in range(_BIO_READS):
            try:
                data += self.conn.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                break
        if data:
            for datagram in pack_datagrams(split_records(data), limit=MAX_UDP_PAYLOAD):
                self.send(datagram, self.address)

    # -- the publish budget -------------------------------------------------------------------

    def take_token(self, rate: float, now: float) -> bool:
        """One publish under ``rate`` a second (a burst of one second's worth); 0: no limit."""
        if rate <= 0:
            return True
        self.rate_tokens = min(rate, self.rate_tokens + (now - self.rate_stamp) * rate)
        self.rate_stamp = now
        if self.rate_tokens < 1.0:
            return False
        self.rate_tokens -= 1.0
        return True
