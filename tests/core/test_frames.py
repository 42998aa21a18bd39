"""Length-prefixed framing: any split of the stream decodes the same; bad lengths fail early."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemsg.core.frames import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder, encode_frame
from securemsg.errors import ProtocolError

PAYLOADS = [b'{"type":"ping","id":1}', b"x", b"\x00" * 300, b'{"type":"bye"}']
STREAM = b"".join(encode_frame(p) for p in PAYLOADS)


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def tr(data: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> Iterator[list[bytes]]:
    """Decode ``data`` whole, one byte at a time, and with trailing partial bytes (h11's ``tr``).

    Yields the frames of each way; the trailing bytes must stay buffered, not decoded.
    """
    decoder = FrameDecoder(max_frame)
    yield decoder.feed(data)
    assert decoder.buffered == 0

    decoder = FrameDecoder(max_frame)
    frames: list[bytes] = []
    for index in range(len(data)):
        frames += decoder.feed(data[index : index + 1])
    assert decoder.buffered == 0
    yield frames

    trailing = encode_frame(b"partial")[:-3]
    decoder = FrameDecoder(max_frame)
    yield decoder.feed(data + trailing)
    assert decoder.buffered == len(trailing)


def test_encode_frame_prefixes_the_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 258)[:HEADER_SIZE] == b"\x00\x00\x01\x02"


def test_frames_round_trip_whole_byte_by_byte_and_with_trailing_bytes() -> None:
    for frames in tr(STREAM):
        assert frames == PAYLOADS


def test_a_frame_of_exactly_max_frame_bytes_is_accepted() -> None:
    for frames in tr(encode_frame(b"y" * 16), max_frame=16):
        assert frames == [b"y" * 16]


def test_an_empty_feed_returns_nothing() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_a_zero_length_frame_is_bad_frame() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(header(0))
    assert info.value.code == "bad_frame"


def test_an_oversized_length_is_too_large_as_soon_as_the_header_is_in() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(header(101)[:3]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(header(101)[3:])  # not one byte of the body yet
    assert info.value.code == "too_large"
    assert decoder.buffered == 0


def test_an_oversized_length_is_refused_without_buffering_its_body() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(header(2**32 - 1) + b"z" * 1000)
    assert info.value.code == "too_large"
    assert decoder.buffered == 0


def test_frames_before_a_bad_header_are_returned_and_the_error_comes_next() -> None:
    decoder = FrameDecoder(max_frame=100)
    frames = decoder.feed(encode_frame(b"one") + encode_frame(b"two") + header(101))
    assert frames == [b"one", b"two"]
    assert decoder.error is not None
    assert decoder.error.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"")
    assert info.value.code == "too_large"


def test_a_failed_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(header(0))
    for _ in range(2):
        with pytest.raises(ProtocolError) as info:
            decoder.feed(encode_frame(b"fine"))
        assert info.value.code == "bad_frame"


def test_max_frame_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=0)


# -- properties -------------------------------------------------------------------------------

payloads = st.lists(st.binary(min_size=1, max_size=64), max_size=12)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(payloads, st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_of_a_valid_stream_decodes_identically(
    frames: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder(max_frame=64)
    decoded: list[bytes] = []
    for chunk in split(stream, cuts):
        decoded += decoder.feed(chunk)
    assert decoded == frames
    assert decoder.buffered == 0


@given(st.lists(st.binary(max_size=80), max_size=10))
@settings(max_examples=300)
def test_arbitrary_bytes_raise_nothing_but_protocol_error_and_buffer_at_most_one_frame(
    chunks: list[bytes],
) -> None:
    max_frame = 32
    decoder = FrameDecoder(max_frame)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except ProtocolError as exc:
            assert exc.code in {"bad_frame", "too_large"}
            return
        assert all(1 <= len(f) <= max_frame for f in frames)
        assert decoder.buffered <= max_frame + HEADER_SIZE


# -- cost -------------------------------------------------------------------------------------


def _bytes_allocated_feeding(frame: bytes, chunk: int) -> tuple[int, list[bytes]]:
    """Bytes allocated in all while ``frame`` is fed ``chunk`` bytes at a time (tracemalloc
    counts every allocation, so a copy of the partial frame per read shows up in full)."""
    import tracemalloc

    pieces = [frame[i : i + chunk] for i in range(0, len(frame), chunk)]
    decoder = FrameDecoder(max_frame=len(frame))
    frames: list[bytes] = []
    tracemalloc.start()
    try:
        allocated = 0
        for piece in pieces:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            frames += decoder.feed(piece)
            allocated += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return allocated, frames


def test_feeding_a_frame_in_small_reads_costs_about_what_feeding_it_in_large_ones_does() -> None:
    # One 1 MiB frame in 4,096 reads of 256 bytes against 16 reads of 64 KiB: the work must
    # grow with the bytes fed, not with the bytes fed times the reads (a partial frame
    # re-copied on every read is 4,096 copies of up to 1 MiB: ~2 GiB allocated).
    payload = bytes(range(256)) * 4096
    frame = encode_frame(payload)
    small, small_frames = _bytes_allocated_feeding(frame, 256)
    large, large_frames = _bytes_allocated_feeding(frame, 64 * 1024)
    assert small_frames == large_frames == [payload]
    assert small <= 3 * large + 64 * 1024, (small, large)
    assert small <= 4 * len(frame), small


def test_a_limited_feed_keeps_the_rest_for_a_later_feed_under_the_new_max_frame() -> None:
    # The client reads welcome alone, then the frames after it under welcome's max_frame.
    decoder = FrameDecoder(max_frame=16)
    big = encode_frame(b"z" * 40)
    assert decoder.feed(encode_frame(b"first") + big + encode_frame(b"x"), limit=1) == [b"first"]
    assert decoder.error is None
    decoder.max_frame = 64
    assert decoder.feed(b"") == [b"z" * 40, b"x"]
    assert decoder.buffered == 0
