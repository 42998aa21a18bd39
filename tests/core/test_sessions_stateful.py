"""A client and a server, driven at random: nothing is lost, duplicated or reordered.

The machine plays both drivers over the sans-I/O core. The server keeps one session (a
:class:`DeliveryLog` of numbered messages and the :class:`RecentIds` of client publishes);
the client keeps an :class:`Inbox` and an :class:`Outbox`. Hypothesis interleaves client
publishes, server messages, acknowledgements, arbitrary splits of both byte streams, clock
jumps (heartbeats and timeouts), connection cuts with a resume (or an expired session), and
garbage written into the server's stream.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from securemsg.core.connection import (
    Client,
    ConnectionState,
    FrameRejected,
    MessageReceived,
    PeerTimedOut,
    Server,
)
from securemsg.core.delivery import (
    DeliveryLog,
    Inbox,
    Outbox,
    RecentIds,
    message_prefix,
    splice_frame,
)
from securemsg.core.messages import (
    Ack,
    Delivery,
    Error,
    Heartbeat,
    Hello,
    Join,
    Members,
    Message,
    Publish,
    ServerAck,
    Welcome,
    Who,
    encode,
    encode_frame_of,
)

INTERVAL = 10.0
TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING = 12
MAX_OUTBOX = 6
DEDUP_WINDOW = MAX_OUTBOX  # the smallest window that still catches every resend
OPEN = ConnectionState.OPEN

rooms = st.sampled_from(["chat", "chat.general", "sensors.kitchen.temp"])
lags = st.integers(min_value=0, max_value=3)
chunk_sizes = st.integers(min_value=1, max_value=400)
small_jumps = st.floats(min_value=0.0, max_value=2.0)
clock_jumps = st.one_of(small_jumps, small_jumps, small_jumps, st.floats(0.0, 2 * TIMEOUT))


def note(what: str) -> None:
    """Count ``what`` for ``--hypothesis-show-statistics`` (also callable outside a run)."""
    if currently_in_test_context():
        event(what)


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        # Server-side session state; it outlives connections until it expires.
        self.session_alive = False
        self.sessions = 0  # the server's current token is f"s{sessions}"
        self.log = DeliveryLog(MAX_PENDING)
        self.recent = RecentIds(DEDUP_WINDOW)
        self.routed: list[str] = []
        self.bodies: dict[int, int] = {}
        self.published = 0
        # Client-side state; it outlives connections too.
        self.inbox = Inbox()
        self.outbox = Outbox(MAX_OUTBOX)
        self.delivered: list[int] = []
        self.token: str | None = None  # the client's, from the last welcome

    # -- helpers --------------------------------------------------------------------------------

    def _connect(self, *, lag: int = 0) -> None:
        options: dict[str, Any] = {"heartbeat_interval": INTERVAL, "heartbeat_timeout": TIMEOUT}
        self.client = Client(now=self.now, **options)
        self.server = Server(now=self.now, handshake_timeout=HANDSHAKE_TIMEOUT, **options)
        self.accepted = False
        self.tainted = False  # garbage went into the server's stream
        self.to_server = bytearray()
        self.to_client = bytearray()
        if self.token is not None:
            # A lagging last_seq (say, from state saved a little earlier) is allowed: the
            # replay then overlaps what the inbox has, and the inbox drops the overlap.
            last_seq = max(0, self.inbox.last_seq - lag)
            # Acks in flight died with the old connection; the server now knows last_seq only,
            # so what the replay brings again must be acknowledged again.
            self.inbox.acked = min(self.inbox.acked, last_seq)
            hello = Hello(version=2, name="alice", session=self.token, last_seq=last_seq)
        else:
            hello = Hello(version=2, name="alice")
        self.client.hello(hello)

    def _handshake(self) -> None:
        """Deliver the hello and the welcome (with any replay) whole, at once."""
        self._to_server(1 << 20)
        self._to_client(1 << 20)

    def _pump(self) -> None:
        self.to_server += b"".join(self.client.data_to_send())
        self.to_client += b"".join(self.server.data_to_send())

    def _server_live(self) -> bool:
        return self.accepted and self.server.state is OPEN

    def _to_server(self, size: int) -> None:
        self._pump()
        data = bytes(self.to_server[:size])
        del self.to_server[:size]
        for received in self.server.receive_data(data, self.now):
            if isinstance(received, FrameRejected):
                assert self.tainted, f"an honest client was rejected: {received}"
            elif isinstance(received, MessageReceived):
                self._server_handles(received.message)

    def _server_handles(self, message: Any) -> None:
        kind = type(message)
        if kind is Hello:
            self._server_accepts(message)
        elif kind is Ack:
            self.log.ack(message.seq)  # an honest client never acks beyond last_seq
        elif kind is Publish:
            if message.id is not None:
                if self.recent.seen(message.id):
                    note("a resent publish was acknowledged, not routed again")
                else:
                    self.routed.append(message.id)
                self.server.send(ServerAck(ids=[message.id]))
        elif kind is Join and message.id is not None:
            self.server.send(ServerAck(ids=[message.id]))
        elif kind is Who:
            self.server.send(Members(room=message.room, names=["alice"], ref=message.id))

    def _server_accepts(self, hello: Hello) -> None:
        resumed = self.session_alive and hello.session == f"s{self.sessions}"
        if not resumed:  # a new session numbers from 1 and remembers no ids
            self.sessions += 1
            self.log = DeliveryLog(MAX_PENDING)
            self.recent = RecentIds(DEDUP_WINDOW)
            self.routed = []
            self.bodies = {}
            self.session_alive = True
        welcome = Welcome(
            version=2,
            session=f"s{self.sessions}",
            name="alice",
            resumed=resumed,
            heartbeat=Heartbeat(interval=INTERVAL, timeout=TIMEOUT),
            max_frame=1024 * 1024,
        )
        self.server.accept(welcome)
        self.accepted = True
        if resumed:
            replay = list(self.log.replay(hello.last_seq or 0))
            note(f"resumed with {'some' if replay else 'nothing'} to replay")
            for seq, prefix in replay:
                self.server.send_frame(splice_frame(prefix, seq))

    def _to_client(self, size: int) -> None:
        self._pump()
        data = bytes(self.to_client[:size])
        del self.to_client[:size]
        for received in self.client.receive_data(data, self.now):
            assert not isinstance(received, FrameRejected), f"the server misbehaved: {received}"
            if isinstance(received, MessageReceived):
                self._client_handles(received.message)

    def _client_handles(self, message: Any) -> None:
        kind = type(message)
        if kind is Welcome:
            self.client.set_heartbeat(
                interval=message.heartbeat.interval, timeout=message.heartbeat.timeout
            )
            self.token = message.session
            if not message.resumed:
                self.inbox.reset()
                self.delivered = []
            for frame in self.outbox.unacked():
                self.client.send_frame(frame)
        elif kind is Message:
            if self.inbox.accept(message.seq):
                self.delivered.append(message.seq)
                assert message.body == self.bodies[message.seq]
            else:
                note("the inbox dropped a replayed message")
        elif kind is ServerAck:
            for ref in message.ids:
                self.outbox.ack(ref)
        elif kind is Error:
            assert self.tainted or message.code in {"heartbeat_timeout", "handshake_timeout"}

    # -- connections --------------------------------------------------------------------------

    @initialize(handshake_now=st.booleans())
    def client_connects(self, handshake_now: bool) -> None:
        self._connect()
        if handshake_now:
            self._handshake()

    @rule(expire=st.sampled_from([False, False, True]), handshake_now=st.booleans(), lag=lags)
    def connection_is_cut_and_the_client_resumes(
        self, expire: bool, handshake_now: bool, lag: int
    ) -> None:
        self.client.connection_lost()
        self.server.connection_lost()
        if expire:
            self.session_alive = False
        self._connect(lag=lag)
        if handshake_now:
            self._handshake()

    # -- client rules -----------------------------------------------------------------------

    @precondition(lambda self: self.client.state is OPEN and not self.outbox.full)
    @rule(room=rooms)
    def client_publishes(self, room: str) -> None:
        msg_id = self.outbox.new_id()
        frame = encode_frame_of(Publish(room=room, body=msgspec.Raw(b'"hi"'), id=msg_id))
        self.outbox.add(msg_id, frame)
        self.client.send_frame(frame)

    @precondition(lambda self: self.client.state is OPEN)
    @rule(room=rooms, with_id=st.booleans(), who=st.booleans())
    def client_joins_or_asks_who(self, room: str, with_id: bool, who: bool) -> None:
        msg_id = "j" if with_id else None
        self.client.send(Who(room=room, id=msg_id) if who else Join(room=room, id=msg_id))

    @precondition(lambda self: self.client.state is OPEN)
    @rule()
    def client_acks(self) -> None:
        due = self.inbox.ack_due()
        if due is not None:
            self.client.send(Ack(seq=due))

    # -- server rules -----------------------------------------------------------------------

    @precondition(lambda self: not self.log.full)
    @rule()
    def server_publishes(self) -> None:
        self.published += 1
        message = Delivery(
            room="chat",
            sender="bob",
            body=msgspec.Raw(b"%d" % self.published),
            ts=self.now,
            seq=0,
        )
        prefix = message_prefix(encode(message))
        seq = self.log.append(prefix)
        self.bodies[seq] = self.published
        if self._server_live():
            self.server.send_frame(splice_frame(prefix, seq))

    # -- the wire and the clock -------------------------------------------------------------

    @rule(size=chunk_sizes)
    def bytes_reach_the_server(self, size: int) -> None:
        self._to_server(size)

    @rule(size=chunk_sizes)
    def bytes_reach_the_client(self, size: int) -> None:
        self._to_client(size)

    @rule(jump=clock_jumps)
    def time_passes(self, jump: float) -> None:
        self.now += jump
        for conn in (self.client, self.server):
            for timed_out in conn.tick(self.now):
                assert isinstance(timed_out, PeerTimedOut)
                assert conn.state is ConnectionState.CLOSING
                note(f"{type(conn).__name__.lower()} saw {timed_out.code}")

    @rule(garbage=st.binary(min_size=1, max_size=12))
    def garbage_reaches_the_server(self, garbage: bytes) -> None:
        self._pump()
        self.tainted = True
        self.to_server += garbage

    @precondition(
        lambda self: self.client.state is OPEN and self._server_live() and not self.tainted
    )
    @rule()
    def everything_settles(self) -> None:
        """Deliver everything both ways with no time passing: nothing may be missing."""
        for _ in range(100):
            self.client_acks()
            self._pump()
            if not self.to_server and not self.to_client:
                break
            self._to_server(len(self.to_server))
            self._to_client(len(self.to_client))
        assert self.delivered == list(range(1, self.log.last_seq + 1))
        assert self.log.acked == self.log.last_seq
        assert len(self.log) == 0
        assert len(self.outbox) == 0
        note(f"settled with {'some' if self.delivered else 'no'} messages delivered")

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def delivered_seqs_are_contiguous_from_one(self) -> None:
        assert self.delivered == list(range(1, len(self.delivered) + 1))
        assert self.inbox.last_seq == len(self.delivered)

    @invariant()
    def the_delivery_log_is_bounded_and_consistent(self) -> None:
        assert len(self.log) <= self.log.max_pending
        assert self.log.acked <= self.log.last_seq
        if self.token == f"s{self.sessions}":  # both ends speak of the same session
            assert len(self.delivered) <= self.log.last_seq

    @invariant()
    def no_publish_is_routed_twice_in_a_session(self) -> None:
        assert len(self.routed) == len(set(self.routed))
        assert len(self.outbox) <= MAX_OUTBOX


ProtocolMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None
)
TestProtocolMachine = ProtocolMachine.TestCase


# -- the rarer paths, walked on purpose ---------------------------------------------------------


def check(machine: ProtocolMachine) -> None:
    machine.delivered_seqs_are_contiguous_from_one()
    machine.the_delivery_log_is_bounded_and_consistent()
    machine.no_publish_is_routed_twice_in_a_session()


def test_a_publish_resent_after_a_cut_is_acknowledged_but_not_routed_again() -> None:
    machine = ProtocolMachine()
    machine.client_connects(handshake_now=True)
    machine.client_publishes("chat")
    machine.bytes_reach_the_server(1 << 20)  # routed; the ack dies with the connection
    machine.connection_is_cut_and_the_client_resumes(expire=False, handshake_now=True, lag=0)
    machine.everything_settles()
    assert machine.routed == ["1"]
    check(machine)


def test_a_replay_that_overlaps_the_inbox_delivers_nothing_twice() -> None:
    machine = ProtocolMachine()
    machine.client_connects(handshake_now=True)
    machine.server_publishes()
    machine.server_publishes()
    machine.bytes_reach_the_client(1 << 20)
    machine.connection_is_cut_and_the_client_resumes(expire=False, handshake_now=True, lag=2)
    machine.server_publishes()
    machine.everything_settles()
    assert machine.delivered == [1, 2, 3]
    check(machine)


def test_an_expired_session_starts_over_and_the_outbox_is_sent_again() -> None:
    machine = ProtocolMachine()
    machine.client_connects(handshake_now=True)
    machine.server_publishes()
    machine.bytes_reach_the_client(1 << 20)
    machine.client_publishes("chat")
    machine.connection_is_cut_and_the_client_resumes(expire=True, handshake_now=True, lag=0)
    machine.everything_settles()
    assert machine.token == "s2"
    assert machine.delivered == []
    assert machine.routed == ["1"]  # the unacknowledged publish went out again
    check(machine)
