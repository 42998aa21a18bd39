"""TLS over a plain TCP transport, for the server's connections.

Why not ``connect_accepted_socket(ssl=...)``: uvloop's SSL protocol allocates a 256 KiB
read buffer per connection (``SSL_READ_MAX_SIZE``, fixed at compile time) and keeps it for
the connection's life; the page it reads into stays resident, 4 KiB per idle connection,
with ~1.5 KB more of Python objects (the protocol, its app transport, a write backlog
deque, the extra-info dict and cipher tuple). asyncio's SSL protocol keeps ~256 KB of
Python buffers per connection. Here the TCP transport reads into the thread's shared
buffer (:func:`~securemsg.core.readbuffer.read_buffer`), the bytes go straight into the
``SSLObject``'s incoming ``MemoryBIO``, and what it decrypts is handed to the application
protocol in that same buffer: an idle connection holds its OpenSSL state and nothing else.

Theory of operation. One object is both the TCP transport's protocol (``get_buffer``,
``buffer_updated``, ``eof_received``, ``connection_lost``, ``pause_writing``,
``resume_writing``) and the application protocol's transport (``write``, ``close``,
``abort``, ``pause_reading``, ...). States, in order: HANDSHAKE (``do_handshake`` on every
read; ``when_handshaken`` tells when it is done), OPEN (reads are decrypted for the
application, writes encrypted at once: a memory BIO never blocks, so nothing is buffered
here and the TCP transport's write buffer is the only one, with its flow control), SHUTDOWN
(after ``close()``: our close_notify is out, application data is read into the void until
the peer's close_notify, then TCP closes; :data:`SHUTDOWN_TIMEOUT` bounds the wait, as the
SSL transports' ``ssl_shutdown_timeout`` does) and CLOSED. A handshake failure closes TCP
without flushing OpenSSL's alert, as uvloop's and asyncio's SSL transports do.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from securemsg.core.readbuffer import read_buffer

__all__ = ["SHUTDOWN_TIMEOUT", "Application", "TLSTransport"]

#: Seconds a closing connection waits for the peer's close_notify (asyncio's and uvloop's
#: default ``ssl_shutdown_timeout``).
SHUTDOWN_TIMEOUT: Final = 30.0
#: Bytes of ciphertext held while the application does not read before TCP stops reading
#: (uvloop's SSL transport: 256 KiB).
_INCOMING_HIGH: Final = 256 * 1024
#: Bytes read into the void per call while shutting down.
_READ_SIZE: Final = 64 * 1024


class Application(Protocol):
    """What the application protocol must be: a buffered protocol (ServerConnection)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class _State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    SHUTDOWN = "shutdown"
    CLOSED = "closed"


class TLSTransport(asyncio.Transport, asyncio.BufferedProtocol):
    """The server side of one TLS connection over a TCP transport (see the module doc)."""

    # A server holds thousands of these, mostly idle.
    __slots__ = (
        "_app",
        "_app_reading",
        "_buffer",
        "_context",
        "_error",
        "_incoming",
        "_loop",
        "_on_handshake",
        "_outgoing",
        "_read_scheduled",
        "_ssl",
        "_sslobj",
        "_state",
        "_tcp",
        "_tcp_paused",
        "_timer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: ssl.SSLContext,
        app: Application,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._context = context
        self._app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # The SSLObject's read, write, pending and do_handshake are Python methods that only
        # call the same method of the C object it wraps (CPython's ``_sslobj``, there since
        # 3.5): a dozen Python calls per connection fewer when called directly. Elsewhere
        # the SSLObject itself, whose methods take the same arguments.
        self._sslobj: Any = getattr(self._ssl, "_sslobj", self._ssl)
        self._buffer = read_buffer()
        self._tcp: asyncio.Transport | None = None
        self._state = _State.HANDSHAKE
        self._on_handshake: Callable[[BaseException | None], None] | None = None
        self._app_reading = True
        self._tcp_paused = False
        self._read_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None

    def when_handshaken(self, callback: Callable[[BaseException | None], None]) -> None:
        """``callback(None)`` once the handshake is done (the application protocol is
        connected just before), ``callback(exc)`` when it failed; called from the read that
        ended it, once. Set it before the first bytes come in. (A callback, not a future:
        this runs for every connection, and a future cost a loop turn and ~5 calls.)"""
        assert self._state is _State.HANDSHAKE, "when_handshaken() after the handshake"
        self._on_handshake = callback

    def feed(self, data: bytes) -> None:
        """Bytes read from the TCP transport before this layer became its protocol (the
        ClientHello the server looked at), as if read now."""
        view = memoryview(data)
        while view and self._state is not _State.CLOSED and self._tcp is not None:
            count = min(len(self._buffer), len(view))
            self._buffer[:count] = view[:count]
            view = view[count:]
            self.buffer_updated(count)

    # -- the TCP transport's protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = transport  # type: ignore[assignment]  # a TCP transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Copied into the BIO at once; the buffer is then free to take the plaintext.
        incoming = self._incoming
        incoming.write(self._buffer[:nbytes])
        state = self._state
        if state is _State.OPEN:
            if self._app_reading:
                self._read()
            elif incoming.pending > _INCOMING_HIGH and self._tcp is not None:
                self._tcp_paused = True
                self._tcp.pause_reading()
        elif state is _State.HANDSHAKE:
            self._handshake()
        elif state is _State.SHUTDOWN:
            self._shutdown()

    def eof_received(self) -> bool | None:
        # A TCP EOF without close_notify is a broken connection, not a graceful end: the
        # application gets connection_lost, not eof_received (as uvloop does).
        if self._state is _State.HANDSHAKE:
            self._fail_handshake(ConnectionResetError("the client closed during the handshake"))
        return None  # the TCP transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, _State.CLOSED
        self._cancel_timer()
        if state is _State.HANDSHAKE:
            self._tcp = None  # closed already
            self._fail_handshake(exc or ConnectionResetError("connection lost in the handshake"))
        else:  # the application was connected
            error = self._error if self._error is not None else exc
            self._app.connection_lost(error)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        if self._state is not _State.HANDSHAKE:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._state is not _State.HANDSHAKE:
            self._app.resume_writing()

    # -- handshake, reading, shutdown ---------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except Exception as exc:
            self._fail_handshake(exc)
            return
        self._flush()
        self._state = _State.OPEN
        callback, self._on_handshake = self._on_handshake, None
        self._app.connection_made(self)
        if callback is not None:
            callback(None)
        if self._state is _State.OPEN:
            self._read()  # what came with the client's Finished (its hello, often)

    def _fail_handshake(self, exc: BaseException) -> None:
        callback, self._on_handshake = self._on_handshake, None
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.abort()
        if callback is not None:
            callback(exc)

    def _read(self) -> None:
        """Decrypt what is there for the application, while it reads: as many records as
        fit in its buffer per ``buffer_updated`` (a record holds at most 16 KiB)."""
        app, incoming, sslobj = self._app, self._incoming, self._sslobj
        pending: Callable[[], int] = sslobj.pending
        # With a buffer, read returns a count.
        read: Callable[[int, memoryview], int] = sslobj.read
        while self._app_reading and self._state is _State.OPEN:
            # Nothing buffered on either side of OpenSSL: a read could only raise
            # SSLWantReadError, which costs ~1 us; a partial record still gets one.
            if not incoming.pending and not pending():
                break
            buffer = app.get_buffer(-1)
            size, filled = len(buffer), 0
            more, ended = True, False
            try:
                while filled < size:
                    count = read(size - filled, buffer[filled:] if filled else buffer)
                    if not count:  # the peer's close_notify
                        ended = True
                        break
                    filled += count
                    if not incoming.pending and not pending():
                        more = False
                        break
            except ssl.SSLWantReadError:
                more = False
            except ssl.SSLZeroReturnError:
                ended = True
            except ssl.SSLError as exc:  # a bad record: the connection cannot go on
                self._fatal(exc)
                return
            if filled:
                app.buffer_updated(filled)
            if ended:
                self._peer_closed()
                return
            if not more:
                break
        self._flush()  # a KeyUpdate answer, say

    def _peer_closed(self) -> None:
        keep_open = self._app.eof_received()
        if not keep_open:
            self.close()

    def _shutdown(self) -> None:
        """Our close_notify out; skip application data until the peer's, then close TCP."""
        read: Callable[[int, memoryview], int] = self._sslobj.read
        try:
            while read(_READ_SIZE, self._buffer):
                pass
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass  # the peer's close_notify already came, or the stream is broken: close
        sslobj = self._sslobj
        try:
            if sslobj is self._ssl:
                sslobj.unwrap()
            else:  # SSLObject.unwrap() only calls the C object's shutdown() (see __init__)
                sslobj.shutdown()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError):
            pass
        self._flush()
        self._close_tcp()

    def _fatal(self, exc: BaseException) -> None:
        self._error = exc
        self._state = _State.CLOSED
        if self._tcp is not None:
            self._tcp.abort()

    def _flush(self) -> None:
        if self._outgoing.pending and self._tcp is not None:
            self._tcp.write(self._outgoing.read())

    def _close_tcp(self) -> None:
        self._cancel_timer()
        if self._tcp is not None:
            self._tcp.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _read_later(self) -> None:
        self._read_scheduled = False
        if self._state is _State.OPEN:
            self._read()

    # -- the application's transport ----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and self._state is _State.OPEN and self._encrypt(data):
            self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_and_close(self, data: bytes) -> None:
        """:meth:`write` then :meth:`close`, in one TCP write: the last frames (a ``bye``,
        an error) and the close_notify leave together, one system call (and one wake-up of
        the peer) fewer per connection than a write and a close."""
        if data and self._state is _State.OPEN and not self._encrypt(data):
            return
        self.close()

    def _encrypt(self, data: bytes | bytearray | memoryview) -> bool:
        """``data`` into the TLS layer; False when that failed the connection."""
        try:
            self._sslobj.write(data)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return False
        return True

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.SHUTDOWN
            self._timer = self._loop.call_later(SHUTDOWN_TIMEOUT, self.abort)
            self._shutdown()
        elif self._state is _State.HANDSHAKE:
            self._fail_handshake(ConnectionAbortedError("closed during the handshake"))

    def abort(self) -> None:
        self._cancel_timer()
        if self._state is _State.HANDSHAKE:
            self._fail_handshake(ConnectionAbortedError("aborted during the handshake"))
        elif self._tcp is not None:
            if self._state is not _State.CLOSED:
                self._state = _State.SHUTDOWN  # connection_lost comes from the TCP transport
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._state is not _State.OPEN

    def pause_reading(self) -> None:
        # TCP goes on reading into the incoming BIO up to _INCOMING_HIGH (see buffer_updated):
        # pausing it at once would stall a sender at every slice the application takes.
        self._app_reading = False

    def resume_reading(self) -> None:
        if self._app_reading:
            return
        self._app_reading = True
        if self._tcp_paused and self._tcp is not None:
            self._tcp_paused = False
            self._tcp.resume_reading()
        # What the BIO holds is not read again by TCP: go on with it now.
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._read_later)

    def is_reading(self) -> bool:
        return self._app_reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._tcp is None else self._tcp.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._tcp is None else self._tcp.get_write_buffer_limits()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # Computed when asked, not kept: an idle connection holds no cipher tuple or dict.
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if name == "compression":
            return self._ssl.compression()
        if self._tcp is None:
            return default
        return self._tcp.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = cast(Application, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._app)
