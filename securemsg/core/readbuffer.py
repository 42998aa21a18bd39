"""The buffer TLS decrypts into: one per thread, shared by that thread's connections.

For a plain ``asyncio.Protocol``, the SSL transports of asyncio and uvloop call
``SSLObject.read(256 KiB)`` for every read: CPython allocates a 256 KiB bytes object (an
``mmap``), shrinks it to what arrived (``mremap``) and frees it (``munmap``), three system
calls and a page fault per read, which strace showed on every request/reply round trip.
A ``BufferedProtocol`` hands the transport a buffer instead (``get_buffer``), and the
transport calls ``buffer_updated`` right after filling it, before anything else runs on
that thread. So one buffer per thread serves every connection, and an idle connection
holds no buffer of its own.
"""

from __future__ import annotations

import threading
from typing import Final

__all__ = ["READ_BUFFER_SIZE", "read_buffer"]

#: What the transports ask for at most; a TLS record holds at most 16 KiB.
READ_BUFFER_SIZE: Final = 256 * 1024

_local = threading.local()


def read_buffer() -> memoryview:
    """This thread's read buffer (each thread runs at most one event loop)."""
    buffer: memoryview | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = memoryview(bytearray(READ_BUFFER_SIZE))
    return buffer
