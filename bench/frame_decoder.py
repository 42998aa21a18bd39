"""Time to decode one 1 MiB frame fed in reads of different sizes: python bench/frame_decoder.py

The frame decoder's work must grow with the bytes fed, not with the number of reads: a peer
that trickles small TLS records must not multiply the server's CPU (issue 11). Prints the
best of several runs for each read size; compare the rows, not the absolute numbers.
"""

from __future__ import annotations

import time

from securemsg.core.frames import FrameDecoder, encode_frame

FRAME = encode_frame(bytes(range(256)) * 4096)  # a 1 MiB payload


def decode_in_reads(read_size: int, *, runs: int = 5) -> float:
    pieces = [FRAME[i : i + read_size] for i in range(0, len(FRAME), read_size)]
    best = float("inf")
    for _ in range(runs):
        decoder = FrameDecoder(max_frame=len(FRAME))
        start = time.perf_counter()
        for piece in pieces:
            decoder.feed(piece)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(f"one frame of {len(FRAME):,} bytes")
    for read_size in (64 * 1024, 16 * 1024, 256, 16):
        reads = -(-len(FRAME) // read_size)
        took = decode_in_reads(read_size, runs=5 if read_size >= 256 else 1)
        print(f"  {reads:>7,} reads of {read_size:>6,} B  {took * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
