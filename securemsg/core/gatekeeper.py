"""The gatekeeper: the server accepts from a publisher only what every client can receive.

Sans-I/O and without recursion. A body that the server relays but a client cannot decode
is poison: the client fails on it, reconnects, is sent it again, and never gets past it.
So the server refuses, with a non-fatal ``bad_message`` that carries the request's ``ref``:

- a body nested deeper than ``max_depth`` arrays and objects. Clients decode bodies with
  msgspec, which recurses once per level and stops at Python's recursion limit (1,000
  frames, less what the client's own stack already holds); the server counts the depth in
  one linear pass over the bytes, outside strings, and never recurses;
- a number that msgspec cannot decode into a Python value: a float whose value rounds to
  infinity (``1e400``) and an integer written with more than 4,300 characters (msgspec's
  limit, the sign included). The server asks msgspec itself, with the very decoder
  clients use (:data:`body_decoder`), so it refuses exactly what a client would fail on;
- a ``publish`` or ``direct`` frame without room for what the server adds to the
  delivered ``message`` (``from``, ``ts``, ``seq``): at most :data:`DELIVERY_HEADROOM`
  bytes, so a frame up to ``max_frame - DELIVERY_HEADROOM`` becomes a delivered frame no
  larger than ``max_frame`` (:func:`delivered_size_bound`).

Cost on the hot path: a body no longer than ``2 * max_depth + 1`` bytes cannot nest past
``max_depth`` and is only decoded by msgspec (~60 ns for a 128-byte string body, ~200 ns
for a small object). A longer one is looked at with bytes methods that run in C: its
brackets counted (only more than ``max_depth`` of them, strings included, call for the
exact count outside strings), and it is decoded only when it holds an exponent or a long
run of digits. A 1 MiB body costs the server at most about what it costs one client to
decode it.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Final

import msgspec

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DELIVERY_HEADROOM",
    "MAX_MAX_DEPTH",
    "body_decoder",
    "body_problem",
    "bracket_skeleton",
    "delivered_size_bound",
    "nesting_exceeds",
    "top_level_value",
]

#: Arrays and objects a body may nest, by default (``max_depth`` of the server).
DEFAULT_MAX_DEPTH: Final = 64
#: The largest ``max_depth`` a server accepts: a client decodes a body recursively, and the
#: recursion limit (1,000) must leave room for the application's own stack.
MAX_MAX_DEPTH: Final = 256

#: How bodies are decoded at the client (``Any``): the server checks with the same decoder.
body_decoder: Final = msgspec.json.Decoder()

# -- headroom ---------------------------------------------------------------------------------

_MAX_NAME: Final = 64  # NAME_PATTERN: the sender's name, 1 to 64 characters needing no escape
_MAX_TS: Final = len("-2.2250738585072014e-308")  # the longest finite float msgspec writes
_MAX_SEQ: Final = len(str(2**53))  # sequence numbers stay below 2**53
#: What a delivered ``message`` can hold beyond the ``publish`` or ``direct`` it relays:
#: ``,"from":"<name>"``, ``,"ts":<float>``, ``,"seq":<int>`` and a type name one byte longer
#: than ``direct``. The rest (room or to, body, id, reply_to or re) is relayed as it came:
#: the body byte for byte, the strings re-encoded by msgspec, which escapes only what JSON
#: requires and so never writes a string longer than the publisher had to.
DELIVERY_HEADROOM: Final = (
    len(',"from":""')
    + _MAX_NAME
    + len(',"ts":')
    + _MAX_TS
    + len(',"seq":')
    + _MAX_SEQ
    + len('"message"')
    - len('"direct"')
)


def delivered_size_bound(payload_size: int) -> int:
    """The most bytes the delivered ``message`` payload of a ``publish`` or ``direct``
    payload of ``payload_size`` bytes can have."""
    return payload_size + DELIVERY_HEADROOM


# -- bodies -----------------------------------------------------------------------------------


def body_problem(body: msgspec.Raw | bytes, *, max_depth: int) -> str | None:
    """Why some client could not decode ``body`` (JSON the server has already parsed), or
    None when every client can."""
    if len(body) > 2 * max_depth + 1:
        # Long enough to nest past max_depth: look before msgspec recurses into it.
        data = bytes(body)
        if data.count(b"[") + data.count(b"{") > max_depth and nesting_exceeds(
            bracket_skeleton(data), max_depth
        ):
            return f"the body nests deeper than max_depth ({max_depth})"
        numberish = data.translate(_NUMBERISH)
        if b"0e" not in numberish and _LONG_DIGITS not in numberish:
            return None  # no exponent, no long number: nothing msgspec could refuse
    try:
        body_decoder.decode(body)
    except RecursionError:  # only if max_depth is near the recursion limit
        return f"the body nests deeper than max_depth ({max_depth})"
    except msgspec.DecodeError as exc:
        return f"a client cannot decode the body: {exc}"
    return None


#: Digits as 0 and E as e: an exponent (always right after a digit) shows as ``0e``.
_NUMBERISH: Final = bytes.maketrans(b"123456789E", b"000000000e")
#: A float past 1.8e308 written without an exponent has 309 digits before its point, an
#: integer msgspec refuses over 4,300 characters.
_LONG_DIGITS: Final = b"0" * 300
_SKELETON: Final = bytes.maketrans(b"[{]}", b"(())")
_NOT_SKELETON: Final = bytes(c for c in range(256) if c not in b'[{]}"')


def bracket_skeleton(data: bytes) -> bytes:
    """The arrays and objects of ``data`` (JSON text) that are outside its strings, as
    ``(`` and ``)``, with bytes methods only (no Python loop over the bytes).

    Escapes go first (``\\\\`` then ``\\"``: backslashes pair from the left, as a JSON
    reader pairs them), so every ``"`` left opens or closes a string. Everything but
    brackets and quotes goes next, so a string without brackets becomes ``""`` and
    splitting on quotes makes only empty pieces, which cost no allocation.
    """
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = data.translate(_SKELETON, _NOT_SKELETON)
    if b'"' not in kept:
        return kept
    # Strings without brackets are ``""`` now. If removing those pairs leaves no quote, there
    # was no other kind: the first string holding a bracket would have left its opening
    # quote alone (only such strings come before it, two quotes each).
    skeleton = kept.replace(b'""', b"")
    if b'"' not in skeleton:
        return skeleton
    return b"".join(kept.split(b'"')[::2])


_STEP: Final = [0] * 256
_STEP[ord("(")] = 1
_STEP[ord(")")] = -1
_PEELS: Final = 4


def nesting_exceeds(skeleton: bytes, limit: int) -> bool:
    """Do the brackets of ``skeleton`` (see :func:`bracket_skeleton`) nest deeper than
    ``limit``? Linear, no recursion; unbalanced brackets count as they open."""
    if skeleton.count(b"(") <= limit:
        return False
    if b"(" * (limit + 1) in skeleton:
        return True
    # Typical data (lists of records) is shallow: each pass drops every innermost pair, so a
    # few passes leave nothing. What is left is measured exactly, one bracket at a time.
    # (Balanced brackets, as in JSON already parsed: each pass lowers the deepest point by
    # exactly one, so a text that a pass empties was exactly that many passes deep.)
    peels = 0
    while peels < _PEELS:
        peeled = skeleton.replace(b"()", b"")
        peels += 1
        if not peeled:
            return peels > limit
        if len(peeled) > len(skeleton) // 2:
            peels -= 1
            break
        skeleton = peeled
    return max(accumulate(map(_STEP.__getitem__, skeleton))) + peels > limit


# -- frames msgspec cannot walk -----------------------------------------------------------------

_MAX_CANDIDATES: Final = 1_000
_INTEGER: Final = re.compile(rb"\s*:\s*(-?[0-9]{1,20})\s*[,}]")


def top_level_value(payload: bytes, key: str) -> str | int | None:
    """The string or integer value of ``key`` in the top-level object of ``payload``, found
    without recursion, for frames too deep for msgspec (the ``ref`` of an error, the
    ``seq`` of a delivered message). None when it is not there or not simple.

    Linear, with bytes methods: escapes are masked (same length, so offsets hold) and the
    text split on quotes, so odd pieces are the insides of strings (no regex, which could
    rescan an unterminated string from every quote).
    """
    masked = payload
    if b"\\" in masked:
        masked = masked.replace(b"\\\\", b"\0\0").replace(b'\\"', b"\0\0")
    pieces = masked.split(b'"')
    if not pieces[0].lstrip().startswith(b"{"):
        return None
    wanted = key.encode()
    depth = offset = counted = 0  # pieces before ``counted`` are in ``depth`` and ``offset``
    index = _find(pieces, wanted, 1)
    # Bounded: a frame stuffed with nested keys named ``key`` must not cost more than that.
    for _ in range(_MAX_CANDIDATES):
        if index is None:
            return None
        between = b"".join(pieces[counted + counted % 2 : index : 2])  # outside strings
        depth += between.count(b"{") + between.count(b"[")
        depth -= between.count(b"}") + between.count(b"]")
        offset += sum(map(len, pieces[counted:index])) + (index - counted)
        counted = index
        if depth == 1 and pieces[index - 1].rstrip().endswith((b"{", b",")):
            value = _value_after(payload, pieces, index, offset)
            if value is not None:
                return value
        index = _find(pieces, wanted, index + 2)
    return None


def _find(pieces: list[bytes], wanted: bytes, start: int) -> int | None:
    # The insides of strings sit at odd indexes; list.index scans in C.
    while start < len(pieces):
        try:
            index = pieces.index(wanted, start)
        except ValueError:
            return None
        if index % 2 == 1:
            return index
        start = index + 1
    return None


def _value_after(payload: bytes, pieces: list[bytes], index: int, offset: int) -> str | int | None:
    """The value after the key whose inside is ``pieces[index]``, at ``offset`` in both
    ``payload`` and the masked text."""
    after = pieces[index + 1] if index + 1 < len(pieces) else b""
    if after.strip() == b":" and index + 3 < len(pieces):
        start = offset + len(pieces[index]) + 1 + len(after) + 1  # the value's inside
        text = payload[start - 1 : start + len(pieces[index + 2]) + 1]
        try:
            return msgspec.json.decode(text, type=str)
        except msgspec.DecodeError:
            return None
    match = _INTEGER.match(after)
    return int(match.group(1)) if match is not None else None
