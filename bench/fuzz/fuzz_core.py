"""Fuzz target: the frame decoder, message validation and the server's protocol core.

One input is a byte stream a hostile client could send, cut into chunks where the input says.
:func:`check` feeds it to

1. a :class:`~securemsg.core.frames.FrameDecoder` (small ``max_frame``), then every payload to
   :func:`~securemsg.core.messages.decode_client` and
   :func:`~securemsg.core.messages.decode_server`;
2. a :class:`securemsg.core.connection.Server` that has accepted a hello (``PROTOCOL_VERSION``),
   every message after it into a real :class:`~securemsg.core.server_session.ServerSession`
   with the broker as router, as the server's driver does, then ticks its clock.

and checks what must always hold: only :class:`~securemsg.errors.ProtocolError` comes out
of the decoders, with a known code; the decoder never holds more than one frame; a message that
decodes re-encodes to one that decodes equal; the protocol core and the session never raise,
only documented events come out, and every frame queued for the peer is a valid server
message; after a fatal rejection the core is closing.

Run with atheris (coverage-guided) when it is installed, else with hypothesis::

    python bench/fuzz/fuzz_core.py /tmp/fuzz-corpus bench/fuzz/seeds -runs=200000
    python bench/fuzz/fuzz_core.py --hypothesis --examples 20000

See ``bench/fuzz/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:  # the target works from a checkout without installing anything but securemsg
    import atheris
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None

USE_ATHERIS = (
    atheris is not None
    and __name__ == "__main__"
    and not {"--hypothesis", "--write-seeds"} & set(sys.argv)
)

if USE_ATHERIS:
    with atheris.instrument_imports(include=["securemsg"]):
        from securemsg.core import connection as protocol
        from securemsg.core import delivery, frames, messages, server_session
        from securemsg.errors import ProtocolError
        from securemsg.server.broker import Broker
else:
    from securemsg.core import connection as protocol
    from securemsg.core import delivery, frames, messages, server_session
    from securemsg.errors import ProtocolError
    from securemsg.server.broker import Broker

MAX_FRAME = 256
DECODE_CODES = frozenset({"bad_frame", "bad_message", "unknown_type"})
FRAME_CODES = frozenset({"bad_frame", "too_large"})
_HELLO = frames.encode_frame(
    b'{"type":"hello","version":%d,"name":"fuzz"}' % messages.PROTOCOL_VERSION
)
_WELCOME = messages.Welcome(
    version=messages.PROTOCOL_VERSION,
    session="s",
    name="fuzz",
    resumed=False,
    heartbeat=messages.Heartbeat(interval=1.0, timeout=3.0),
    max_frame=MAX_FRAME,
)


def chunks(data: bytes) -> list[bytes]:
    """The first byte says how to cut the rest: chunk sizes cycle through its bits."""
    if not data:
        return []
    sizes = [1 + ((data[0] >> shift) & 0x3) * 7 for shift in (0, 2, 4, 6)]
    body, out, index = data[1:], [], 0
    while body:
        size = sizes[index % 4]
        out.append(body[:size])
        body, index = body[size:], index + 1
    return out


def check_decoders(pieces: list[bytes]) -> int:
    """Feed the pieces to a decoder and decode every payload; return the payloads seen."""
    decoder = frames.FrameDecoder(MAX_FRAME)
    seen = 0
    for piece in pieces:
        try:
            payloads = decoder.feed(piece)
        except ProtocolError as exc:
            assert exc.code in FRAME_CODES, exc.code
            return seen
        assert decoder.buffered <= MAX_FRAME + frames.HEADER_SIZE
        for payload in payloads:
            seen += 1
            assert 1 <= len(payload) <= MAX_FRAME
            for decode in (messages.decode_client, messages.decode_server):
                try:
                    message = decode(payload)
                except ProtocolError as exc:
                    assert exc.code in DECODE_CODES, exc.code
                    assert exc.ref is None or isinstance(exc.ref, str)
                    continue
                assert decode(messages.encode(message)) == message
    return seen


class _Link:
    """The broker's view of the fuzzed connection: frames go to its core."""

    def __init__(self, core: protocol.Server) -> None:
        self.core = core

    def queue(self, frame: bytes) -> None:
        self.core.send_frame(frame)

    def queue_message(self, frame: bytes) -> None:
        self.core.send_relayed(frame)

    def queue_delivery(self, prefix: bytes, seq: int) -> None:
        self.core.send_relayed_payload(delivery.splice_payload(prefix, seq))

    def close_with(self, code: str, message: str) -> None:
        self.core.fail(code, message)


_SESSION_EVENTS = (
    server_session.RequestRefused,
    server_session.Joined,
    server_session.Left,
    server_session.Answered,
    protocol.FrameRejected,
)


def check_protocol(pieces: list[bytes]) -> None:
    """The server's core after a hello, its messages into a real ServerSession (the broker
    routing): never raises, only documented events, only ever queues valid frames."""
    core = protocol.Server(now=0.0, max_frame=MAX_FRAME, heartbeat_interval=1.0)
    events = core.receive_data(_HELLO, 0.0)
    assert len(events) == 1 and isinstance(events[0], protocol.MessageReceived)
    broker = Broker(max_pending=8, dedup_window=8, max_msgs_per_sec=20.0)
    link = _Link(core)
    hello = events[0].message
    assert isinstance(hello, messages.Hello)
    session = broker.open(hello, identity=None, link=link, now=0.0).session
    broker.join(session, "chat")  # so that a publish to chat comes back as a delivery
    core.accept(_WELCOME)
    now = 0.0
    for piece in pieces:
        now += 0.25
        for event in core.receive_data(piece, now):
            if isinstance(event, protocol.FrameRejected):
                if event.fatal:
                    assert core.state is protocol.ConnectionState.CLOSING
                continue
            assert isinstance(event, protocol.MessageReceived | protocol.PongReceived), event
            if isinstance(event, protocol.MessageReceived):
                _session_receives(session, broker, link, event.message, now)
        acks = session.acks_to_send(link, sending=core.has_data_to_send)
        if acks is not None:
            core.send(acks)
        core.tick(now)
        for frame in core.data_to_send():
            assert len(frame) - frames.HEADER_SIZE == int.from_bytes(frame[:4], "big")
            messages.decode_server(frame[frames.HEADER_SIZE :])  # raises if we sent garbage
    core.tick(now + 10.0)  # long silence: a heartbeat timeout, never an exception
    for frame in core.data_to_send():
        messages.decode_server(frame[frames.HEADER_SIZE :])


def _session_receives(
    session: server_session.ServerSession[_Link],
    broker: Broker,
    link: _Link,
    message: object,
    now: float,
) -> None:
    """What the driver (server/connection.py) does with one message after the hello."""
    if isinstance(message, messages.Bye):
        broker.end(session, reason="bye")  # type: ignore[arg-type]
        link.core.send_bye("client_bye")
        return
    event = session.receive(message, now, now, broker)  # type: ignore[arg-type]
    assert event is None or isinstance(event, _SESSION_EVENTS), event
    if isinstance(event, server_session.Answered):
        link.queue(event.frame)
    elif isinstance(event, server_session.RequestRefused):
        link.core.send(event.error)
    elif isinstance(event, protocol.FrameRejected):
        link.core.send(messages.Error(code=event.error.code, message=event.error.message))


def check(data: bytes) -> None:
    pieces = chunks(data)
    check_decoders(pieces)
    check_protocol(pieces)


def seeds() -> list[bytes]:
    """Seed inputs: valid client streams and a few near misses (also in ``seeds/``)."""
    frame = frames.encode_frame
    valid = b"".join(
        frame(payload)
        for payload in (
            b'{"type":"join","room":"chat","id":"1"}',
            b'{"type":"publish","room":"chat","body":{"n":[1,2.5,"x",null]},"id":"2"}',
            b'{"type":"direct","to":"bob","body":"hi","re":"t"}',
            b'{"type":"who","room":"chat.*","id":"3"}',
            b'{"type":"ack","seq":3}',
            b'{"type":"ping","id":1}',
            b'{"type":"pong","id":1}',
            b'{"type":"leave","room":"chat","id":"4"}',
            b'{"type":"bye","reason":"done"}',
        )
    )
    return [
        b"\x00" + valid,
        b"\xff" + valid,
        b"\x55" + frame(b'{"type":"message","room":"r","from":"a","body":1,"ts":1.0,"seq":1}'),
        b"\x00" + frame(b'{"type":"publish","room":"a.*","body":1}') + b"\x00\x00\x00\x00",
        b"\x1b" + frame(b'{"type":"hello","version":2,"name":"again"}') + b"\xff\xff\xff\xff",
        b"\x00" + frame(b"[1,2,3]") + frame(b'{"type":"ping","id":1,"x":"\xff"}'),
    ]


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds()):
        (directory / f"seed-{index}").write_bytes(seed)


def run_hypothesis(examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    inputs = st.one_of(
        st.binary(max_size=600),
        st.sampled_from(seeds()).flatmap(
            lambda seed: st.tuples(st.integers(0, len(seed)), st.binary(max_size=40)).map(
                lambda cut: seed[: cut[0]] + cut[1] + seed[cut[0] :]
            )
        ),
    )
    count = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def target(data: bytes) -> None:
        nonlocal count
        count += 1
        check(data)

    target()
    print(f"hypothesis: {count} executions, 0 crashes (a crash raises with its input)")


def main(argv: list[str]) -> None:
    if "--write-seeds" in argv:
        write_seeds(Path(__file__).with_name("seeds"))
        return
    if not USE_ATHERIS:
        examples = 10_000
        if "--examples" in argv:
            examples = int(argv[argv.index("--examples") + 1])
        run_hypothesis(examples)
        return
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
