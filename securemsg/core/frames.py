"""Length-prefixed framing, sans-I/O.

A frame is a 4-byte unsigned big-endian length N followed by N bytes of payload.
:class:`FrameDecoder` is fed bytes as they arrive, in any split, and returns whole payloads.
The length is checked against ``max_frame`` as soon as the header is complete, so an
oversized frame is refused before a byte of its body is buffered.
"""

from __future__ import annotations

import struct

from securemsg.errors import ProtocolError

__all__ = ["DEFAULT_MAX_FRAME", "HEADER_SIZE", "FrameDecoder", "encode_frame"]

DEFAULT_MAX_FRAME = 1024 * 1024
HEADER_SIZE = 4
_HEADER = struct.Struct(">I")
_pack_header = _HEADER.pack
_unpack_header_from = _HEADER.unpack_from


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length."""
    return _pack_header(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the payloads completed by ``data``.

    A bad length prefix raises :class:`ProtocolError`. Frames that were complete before it in
    the same call are returned first, with the error kept in :attr:`error` and raised by the
    next call: the stream cannot be resynchronised, so the decoder stays failed.

    The work is linear in the bytes fed, however they are split: a partial frame is appended
    to, and only looked at again once the read that completes it has arrived (``_need``).
    Re-reading it on every read cost one copy of the partial frame per read: a 1 MiB frame
    in 4,096 reads of 256 bytes allocated 2.4 GB.
    """

    __slots__ = ("_buffer", "_error", "_need", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be at least 1")
        self.max_frame = max_frame
        self._buffer = bytearray()
        # Bytes the buffered partial frame needs before it can be decoded: its whole length
        # once its header is in, else the header's.
        self._need = 0
        self._error: ProtocolError | None = None

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes, *, limit: int = 0) -> list[bytes]:
        """The payloads completed by ``data``; with ``limit``, at most that many, the rest
        kept (``feed(b"")`` goes on), so that a frame can change :attr:`max_frame` for the
        frames after it."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._need:
                return []
            data = bytes(buffer)
            buffer.clear()
        # Payloads are sliced straight out of ``data`` (one copy each) and only a trailing
        # partial frame is buffered: slicing the bytearray would copy every payload twice.
        frames: list[bytes] = []
        offset = 0
        end = len(data)
        max_frame = self.max_frame
        need = HEADER_SIZE
        stop = limit or -1
        while end - offset >= HEADER_SIZE:
            if len(frames) == stop:
                break
            (length,) = _unpack_header_from(data, offset)
            if length == 0 or length > max_frame:
                error = self._fail(length)
                if frames:
                    return frames
                raise error
            start = offset + HEADER_SIZE
            if end - start < length:
                need = HEADER_SIZE + length
                break
            offset = start + length
            frames.append(data[start:offset])
        if offset < end:
            buffer += memoryview(data)[offset:]
            self._need = need
        return frames

    def _fail(self, length: int) -> ProtocolError:
        self._buffer.clear()
        if length == 0:
            error = ProtocolError("bad_frame", "frame length 0 is not allowed")
        else:
            error = ProtocolError(
                "too_large", f"frame of {length} bytes exceeds max_frame {self.max_frame}"
            )
        self._error = error
        return error
