"""Two clients and a server, driven at random on the real session objects: every request is
answered once, nothing is carried out twice, and the application gets every message once,
in order.

Each client is a real :class:`ClientSession` over a real core :class:`Client`; the server is
the real :class:`Broker` (the router) and its real :class:`ServerSession` objects over a core
:class:`Server` per connection. The harness plays the drivers (``server/connection.py``,
``client/mailbox.py``) and the network: arbitrary splits of both byte streams, cuts that lose
what is in flight (the server notices at once, or later: a half-open connection, then a
takeover), delivery frames duplicated, clock jumps (heartbeat timeouts, held-ack timers,
session expiry), and a server that refuses (a direct to a name nobody has). Both clients
join, leave, publish, send directs, ask ``who`` and flush.

Checked all along: the application gets exactly what the broker routed to its session, in
``seq`` order, once; no session carries out a request id twice; a sender's messages arrive in
the order sent; every request is answered at most once. Checked once everything settles (and
at the end of every run): every request answered, the outbox and the server's delivery logs
empty, each session's rooms are the application's intent, every flush completed once and
reports exactly the refusals among what it waited for.

This machine found two more bugs of the session rules, fixed since (each has its walked test
at the end): a refused request whose refusal was lost in a cut was carried out when resent,
after what the client sent later; and a resend was charged to the rate limit, so a request
carried out before the cut could come back refused.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import msgspec
from hypothesis import currently_in_test_context, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from securemsg.core.client_session import (
    Acknowledged,
    Answered,
    ClientSession,
    Flush,
    FlushCompleted,
    Refused,
)
from securemsg.core.connection import (
    Client,
    MessageReceived,
    PongReceived,
    Server,
)
from securemsg.core.delivery import splice_payload
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Delivery,
    Direct,
    Error,
    Heartbeat,
    Hello,
    Join,
    Leave,
    Message,
    Presence,
    Publish,
    Welcome,
    Who,
    decode_server,
)
from securemsg.core.server_session import Answered as WhoAnswered
from securemsg.core.server_session import RequestRefused, ServerSession
from securemsg.errors import ProtocolError
from securemsg.server.broker import Broker

INTERVAL, TIMEOUT, HANDSHAKE_TIMEOUT, TTL = 10.0, 30.0, 5.0, 20.0
MAX_PENDING, MAX_OUTBOX, MAX_FRAME = 6, 5, 1 << 16
HEARTBEAT = {"heartbeat_interval": INTERVAL, "heartbeat_timeout": TIMEOUT}
NAMES = ("alice", "bob")
FATAL_FROM_SERVER = {"slow_consumer", "session_taken_over", "heartbeat_timeout"}

filters = st.sampled_from(["chat", "chat.*", "news"])
topics = st.sampled_from(["chat", "chat.x", "news"])
who_ = st.sampled_from(range(len(NAMES)))
chunk_sizes = st.integers(min_value=1, max_value=300)
small_jumps = st.floats(min_value=0.0, max_value=2.0)
clock_jumps = st.one_of(small_jumps, small_jumps, st.floats(0.0, 2 * TIMEOUT))


def note(what: str) -> None:
    """Count ``what`` for ``--hypothesis-show-statistics`` (also callable outside a run)."""
    if currently_in_test_context():
        hypothesis.event(what)


class RecordingBroker(Broker):
    """The real broker, recording what it carried out for which session."""

    def __init__(self) -> None:
        super().__init__(max_pending=MAX_PENDING, dedup_window=MAX_OUTBOX, session_ttl=TTL)
        self.current: tuple[ServerSession[Any], str | None] | None = None
        #: session token -> the ids of the requests carried out for it, in order.
        self.carried: dict[str, list[str | None]] = {}
        #: recipient token -> (seq, sender name, id, sender token) of each delivery.
        self.routed: dict[str, list[tuple[int, str, str | None, str]]] = {}

    def _carried(self) -> None:
        assert self.current is not None
        session, msg_id = self.current
        self.carried.setdefault(session.token, []).append(msg_id)

    def join(self, session: Any, room_filter: str, *, ref: str | None = None) -> None:
        self._carried()
        super().join(session, room_filter)

    def leave(self, session: Any, room_filter: str, *, ref: str | None = None) -> bool:
        done = super().leave(session, room_filter)
        if done:
            self._carried()
        return done

    def publish(self, session: Any, msg: Publish, ts: float) -> None:
        self._carried()
        super().publish(session, msg, ts)

    def direct(self, session: Any, msg: Direct, ts: float) -> bool:
        done = super().direct(session, msg, ts)
        if done:
            self._carried()
        return done

    def deliver(self, session: Any, prefix: bytes) -> int:
        before = session.delivery.last_seq
        seq = super().deliver(session, prefix)
        if session.delivery.last_seq > before and self.current is not None:
            sender, msg_id = self.current
            entry = (session.delivery.last_seq, sender.name, msg_id, sender.token)
            self.routed.setdefault(session.token, []).append(entry)
        return seq


class Wire:
    """One connection: a client core and a server core joined by two byte streams."""

    def __init__(self, now: float) -> None:
        self.client = Client(now=now, **HEARTBEAT)  # type: ignore[arg-type]
        self.server = Server(now=now, handshake_timeout=HANDSHAKE_TIMEOUT, **HEARTBEAT)
        self.up = bytearray()
        self.down = bytearray()
        self.session: ServerSession[Any] | None = None
        self.welcomed = False
        self.server_open = True  # the server side has not noticed the end yet
        self.duplicate = 0  # delivery frames still to duplicate

    # broker.Link
    #: The simulated write buffer never fills.
    writable = True

    def queue(self, frame: bytes) -> None:
        self.server.send_frame(frame)

    def queue_message(self, frame: bytes) -> None:
        self.server.send_relayed(frame)  # in batches: the client hello'd protocol 3

    def queue_delivery(self, prefix: bytes, seq: int) -> None:
        self.server.send_relayed_payload(splice_payload(prefix, seq))

    # Flow control is tested over real connections (tests/server/test_broker.py,
    # tests/integration/test_flow_control.py); here the driver goes on reading, as the server
    # did before it, so that overflow at max_pending is reached and its rules exercised.
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close_with(self, code: str, message: str) -> None:
        if self.session is not None:
            acks = self.session.take_acks(self)
            if acks is not None:
                self.server.send(acks)
        self.server.fail(code, message)


@dataclass
class App:
    """One client application: what it asked for and what it was handed."""

    name: str
    session: ClientSession
    wire: Wire | None = None
    token: str | None = None  # the session it was last welcomed into
    received: list[tuple[int, str, str | None]] = field(default_factory=list)
    requests: dict[str, Any] = field(default_factory=dict)  # id -> the request, all of them
    answers: Counter[str] = field(default_factory=Counter)
    refused: set[str] = field(default_factory=set)
    flushes: list[tuple[Flush, set[str]]] = field(default_factory=list)
    completed: list[Flush] = field(default_factory=list)
    bodies: int = 0

    def open_ids(self) -> set[str]:
        return {i for i in self.requests if not self.answers[i]}

    def rooms(self, *, planned: bool = False) -> list[str]:
        """The rooms joined, by the answered joins and leaves in the order sent (``planned``:
        by those not refused, answered or not)."""
        rooms: dict[str, None] = {}
        for msg_id, request in self.requests.items():
            if (planned or self.answers[msg_id]) and msg_id not in self.refused:
                if type(request) is Join:
                    rooms[request.room] = None
                elif type(request) is Leave:
                    rooms.pop(request.room, None)
        return list(rooms)


class SessionsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.broker = RecordingBroker()
        self.apps = [App(n, ClientSession(max_outbox=MAX_OUTBOX, request_prefix="rq-"))
                     for n in NAMES]  # fmt: skip
        self.half_open: list[Wire] = []  # cut on the client's side only
        self.settling = False

    # -- the server's driver ----------------------------------------------------------------

    def _server_reads(self, wire: Wire, size: int) -> None:
        data = bytes(wire.up[:size])
        del wire.up[:size]
        for event in wire.server.receive_data(data, self.now):
            if type(event) is PongReceived:
                continue
            assert type(event) is MessageReceived, f"an honest client was rejected: {event}"
            self._server_handles(wire, event.message)
            if not wire.server.is_active:
                break
        self._server_flush(wire)

    def _server_handles(self, wire: Wire, message: Any) -> None:
        if wire.session is None:
            try:
                opened = self.broker.open(message, identity=None, link=wire, now=self.now)
            except ProtocolError as refused:  # the name is held by a half-open connection
                assert refused.code == "name_taken", refused
                wire.server.fail(refused.code, refused.message)
                return
            wire.session = session = opened.session
            heartbeat = Heartbeat(interval=INTERVAL, timeout=TIMEOUT)
            wire.server.accept(
                Welcome(version=PROTOCOL_VERSION, session=session.token, name=session.name,
                        resumed=opened.resumed, heartbeat=heartbeat, max_frame=MAX_FRAME)
            )  # fmt: skip
            for frame in opened.replay:
                wire.server.send_frame(frame)
            return
        self.broker.current = (wire.session, getattr(message, "id", None))
        event = wire.session.receive(message, self.now, self.now, self.broker)
        self.broker.current = None
        if isinstance(event, WhoAnswered):
            wire.queue(event.frame)
        elif isinstance(event, RequestRefused):
            wire.server.send(event.error)
        elif type(event).__name__ == "Relieved":  # an ack ended a congestion: as the driver
            self.broker.relieved(wire.session)
        else:
            assert event is None or type(event).__name__ in {"Joined", "Left"}, event

    def _server_flush(self, wire: Wire, *, acks_due: bool = False) -> None:
        session = wire.session
        if session is not None and session.ack_due_at is not None:
            if acks_due:
                acks = session.take_acks(wire)
            else:
                acks = session.acks_to_send(wire, sending=wire.server.has_data_to_send)
            if acks is not None:
                wire.server.send(acks)
        for frame in wire.server.data_to_send():
            wire.down += frame
            if wire.duplicate and type(decode_server(frame[4:])) is Delivery:
                wire.duplicate -= 1
                wire.down += frame  # the client must drop it by its seq
        if not wire.server.is_active and wire.server_open:
            self._server_lost(wire)  # closing: the driver closes the transport

    def _server_lost(self, wire: Wire) -> None:
        wire.server_open = False
        wire.server.connection_lost()
        if wire.session is not None:
            self.broker.detach(wire.session, wire, self.now)

    # -- the client's driver ----------------------------------------------------------------

    def _connect(self, app: App) -> None:
        wire = app.wire = Wire(self.now)
        last_seq = app.session.last_seq if app.token is not None else None
        wire.client.hello(Hello(version=PROTOCOL_VERSION, name=app.name, session=app.token,
                                last_seq=last_seq))  # fmt: skip
        for frame in wire.client.data_to_send():
            wire.up += frame

    def _client_reads(self, app: App, size: int) -> None:
        wire = app.wire
        assert wire is not None
        if wire.server_open:
            self._server_flush(wire)  # what the broker queued (the driver's call_soon flush)
        data = bytes(wire.down[:size])
        del wire.down[:size]
        events = wire.client.receive_data(data, self.now)
        if not wire.welcomed:
            events = self._handshake(app, wire, events)
        for event in app.session.events_received(events):
            self._client_handles(app, wire, event)
        # The application takes every message as it arrives: acknowledge all received.
        due = app.session.ack_due(None)
        if due is not None:
            wire.client.send(Ack(seq=due))
        for frame in wire.client.data_to_send():
            if wire.server_open:
                wire.up += frame
        if not wire.down and not wire.server_open:
            self._client_lost(app, server_knows=True)  # read to the end: the server closed

    def _handshake(self, app: App, wire: Wire, events: list[Any]) -> list[Any]:
        for index, event in enumerate(events):
            if type(event) is PongReceived:
                continue
            assert type(event) is MessageReceived, event
            welcome = event.message
            if type(welcome) is Error:  # refused: a half-open connection holds the name, or late
                assert welcome.code in {"name_taken", "handshake_timeout"}, welcome
                return []
            assert type(welcome) is Welcome, welcome
            wire.welcomed = True
            wire.client.set_heartbeat(
                interval=welcome.heartbeat.interval, timeout=welcome.heartbeat.timeout
            )
            app.session.max_frame = welcome.max_frame
            note(f"welcomed, resumed={welcome.resumed}")
            if welcome.resumed:
                assert welcome.session == app.token
            else:
                app.token, app.received = welcome.session, []
            before = int(app.session.last_id)
            for frame in app.session.attach(resumed=welcome.resumed, rooms=app.rooms()):
                wire.client.send_frame(frame)
            for number in range(before + 1, int(app.session.last_id) + 1):
                app.requests[str(number)] = "rejoin"  # the session's own joins
            return events[index + 1 :]
        return []

    def _client_handles(self, app: App, wire: Wire, event: Any) -> None:
        kind = type(event)
        if kind is Message:
            app.received.append((event.seq, event.sender, event.id))
        elif kind is Acknowledged:
            for ref in event.ids:
                app.answers[ref] += 1
        elif kind is Answered:
            app.answers[event.ref] += 1
        elif kind is Refused:
            app.answers[event.ref] += 1
            app.refused.add(event.ref)
        elif kind is FlushCompleted:
            app.completed.append(event.flush)
        elif kind is Error:
            assert event.code in FATAL_FROM_SERVER, event
        else:
            assert kind is Presence or type(event).__name__ == "PongReceived", event

    def _client_lost(self, app: App, *, server_knows: bool) -> None:
        wire = app.wire
        assert wire is not None
        app.wire = None
        wire.client.connection_lost()
        wire.up.clear()  # lost in flight
        wire.down.clear()
        if wire.server_open:
            if server_knows:
                self._server_lost(wire)
            else:
                self.half_open.append(wire)

    def _submit(self, app: App, request: Any) -> None:
        frame = app.session.submit(lambda msg_id: msgspec.structs.replace(request, id=msg_id))
        app.requests[app.session.last_id] = request
        if app.wire is not None and app.wire.welcomed:
            app.wire.client.send_frame(frame)
            for data in app.wire.client.data_to_send():
                app.wire.up += data

    # -- connections and the network --------------------------------------------------------

    @initialize()
    def clients_connect(self) -> None:
        for app in self.apps:
            self._connect(app)

    @precondition(lambda self: any(app.wire is None for app in self.apps))
    @rule(who=who_)
    def client_connects(self, who: int) -> None:
        app = self.apps[who]
        if app.wire is None:
            self._connect(app)

    @rule(who=who_, server_knows=st.booleans())
    def connection_is_cut(self, who: int, server_knows: bool) -> None:
        if self.apps[who].wire is not None:
            self._client_lost(self.apps[who], server_knows=server_knows)

    @rule(who=who_, server_knows=st.booleans())
    def the_server_reads_all_and_its_answers_are_lost_in_a_cut(
        self, who: int, server_knows: bool
    ) -> None:
        wire = self.apps[who].wire
        if wire is not None and wire.server_open:
            self._server_reads(wire, len(wire.up))
        self.connection_is_cut(who, server_knows)

    @precondition(lambda self: self.half_open)
    @rule()
    def server_notices_a_dead_connection(self) -> None:
        self._server_lost(self.half_open.pop(0))

    @rule(who=who_, size=chunk_sizes)
    def bytes_reach_the_server(self, who: int, size: int) -> None:
        wire = self.apps[who].wire
        if wire is not None and wire.server_open:
            self._server_reads(wire, size)

    @rule(who=who_, size=chunk_sizes)
    def bytes_reach_the_client(self, who: int, size: int) -> None:
        wire = self.apps[who].wire
        if wire is not None:
            self._client_reads(self.apps[who], size)

    @rule(who=who_, count=st.integers(1, 3))
    def delivery_frames_are_duplicated(self, who: int, count: int) -> None:
        if self.apps[who].wire is not None:
            self.apps[who].wire.duplicate = count  # type: ignore[union-attr]

    @rule(jump=clock_jumps)
    def time_passes(self, jump: float) -> None:
        self.now += jump
        for app in self.apps:
            wire = app.wire
            if wire is not None and wire.client.tick(self.now):
                self._client_lost(app, server_knows=False)  # the client aborts
            elif wire is not None and wire.welcomed:
                for frame in wire.client.data_to_send():  # a ping
                    wire.up += frame
        for wire in [app.wire for app in self.apps if app.wire] + self.half_open:
            if wire.server_open:
                wire.server.tick(self.now)
                due = wire.session is not None and (wire.session.ack_due_at or 1e9) <= self.now
                self._server_flush(wire, acks_due=due)
        self.half_open = [wire for wire in self.half_open if wire.server_open]
        for session in list(self.broker.by_token.values()):
            if session.link is None and (session.expires_at or 1e9) <= self.now:
                self.broker.end(session, reason="expired")

    @rule(who=who_)
    def a_detached_session_expires(self, who: int) -> None:
        session = self.broker.by_name.get(NAMES[who])
        if session is not None and session.link is None:
            self.broker.end(session, reason="expired")

    # -- the applications -------------------------------------------------------------------

    def _room_for(self, who: int) -> bool:
        return not self.apps[who].session.outbox.full

    @precondition(lambda self: not all(app.session.outbox.full for app in self.apps))
    @rule(who=who_, room=topics)
    def app_publishes(self, who: int, room: str) -> None:
        app = self.apps[who]
        if self._room_for(who):
            app.bodies += 1
            self._submit(app, Publish(room=room, body=msgspec.Raw(b"%d" % app.bodies)))

    # Refusals come from a name nobody has; a refusal from a state that a later request
    # changes is walked on purpose at the end.
    @rule(who=who_, myself=st.booleans())
    def app_sends_a_direct(self, who: int, myself: bool) -> None:
        if self._room_for(who):
            to = NAMES[who] if myself else "nobody"
            self._submit(self.apps[who], Direct(to=to, body=msgspec.Raw(b'"psst"')))

    @rule(who=who_, room=filters, kind=st.sampled_from([Join, Join, Leave, Who]))
    def app_joins_leaves_or_asks_who(self, who: int, room: str, kind: Any) -> None:
        app = self.apps[who]
        if kind is Leave and room not in app.rooms(planned=True):
            return
        if self._room_for(who):
            self._submit(app, kind(room=room))

    @rule(who=who_)
    def app_flushes(self, who: int) -> None:
        app = self.apps[who]
        flush = app.session.flush()
        if flush is not None:
            app.flushes.append((flush, app.open_ids()))

    @rule()
    def everything_settles(self) -> None:
        self.settling = True
        settle(self)
        self.settling = False

    def teardown(self) -> None:
        if not self.settling:  # not after a failed settle: its error is the one to see
            settle(self)  # every run ends settled and checked

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def the_application_gets_what_was_routed_once_in_order(self) -> None:
        for app in self.apps:
            routed = self.broker.routed.get(app.token or "", [])
            assert app.received == [entry[:3] for entry in routed[: len(app.received)]]
            seqs = [entry[0] for entry in app.received]
            assert seqs == list(range(1, len(seqs) + 1)), seqs

    @invariant()
    def nothing_is_carried_out_twice_in_a_session(self) -> None:
        for token, ids in self.broker.carried.items():
            assert len(ids) == len(set(ids)), f"carried out twice in {token}: {ids}"
        for routed in self.broker.routed.values():
            for sender in {entry[3] for entry in routed}:
                numbers = [int(e[2] or 0) for e in routed if e[3] == sender]
                assert numbers == sorted(numbers), f"out of order from {sender}: {numbers}"

    @invariant()
    def every_request_is_answered_at_most_once(self) -> None:
        for app in self.apps:
            assert all(count == 1 for count in app.answers.values()), app.answers
            assert not set(app.answers) - set(app.requests)
            assert len(app.session.outbox) == len(app.open_ids())
            assert len(set(map(id, app.completed))) == len(app.completed), "completed twice"


def settle(machine: SessionsMachine) -> None:
    """Connect everyone, notice every dead connection, deliver everything both ways with no
    time passing but the held-ack timers: then nothing may be missing."""
    while machine.half_open:
        machine._server_lost(machine.half_open.pop())
    for _ in range(60):
        busy = False
        for app in machine.apps:
            if app.wire is None:
                machine._connect(app)
            wire = app.wire
            assert wire is not None
            if wire.server_open:
                machine._server_reads(wire, len(wire.up))
                machine._server_flush(wire, acks_due=True)
            machine._client_reads(app, len(wire.down))
            if app.wire is wire and not wire.welcomed and not wire.down and not wire.up:
                machine._client_lost(app, server_knows=True)  # refused: try again
                busy = True
        for app in machine.apps:
            wire = app.wire
            if wire is None or not wire.welcomed or wire.up or wire.down:
                busy = True
            elif wire.server.has_data_to_send:
                busy = True
        if not busy:
            break
    else:
        raise AssertionError("the link never went quiet")
    for app in machine.apps:
        session = machine.broker.by_token[app.token or ""]
        assert app.wire is not None and app.wire.welcomed and session.link is app.wire
        assert app.open_ids() == set() and len(app.session.outbox) == 0
        assert len(session.delivery) == 0, "the server still holds unacknowledged messages"
        assert app.received == [e[:3] for e in machine.broker.routed.get(app.token or "", [])]
        rooms = machine.broker.rooms.filters_of(session)
        assert rooms == set(app.rooms()), f"{app.name} is in {set(rooms)}, meant {app.rooms()}"
        for flush, waited in app.flushes:
            assert sum(f is flush for f in app.completed) == 1, "a flush never completed"
            refused = waited & app.refused
            assert flush.refused == len(refused), (
                f"the flush counted {flush.refused} refusals; refused were {sorted(refused)}"
            )
            assert (flush.error() is not None) == bool(refused), "a refusal passed as success"
        note(f"settled: {bool(app.received)} received, {bool(app.refused)} refused")
    for app in machine.apps:
        app.flushes.clear()
        app.completed.clear()


SessionsMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("STATEFUL_EXAMPLES", "400")),
    stateful_step_count=50,
    deadline=None,
)
TestSessionsMachine = SessionsMachine.TestCase


# -- the rarer paths, walked on purpose ---------------------------------------------------------


def connected() -> SessionsMachine:
    machine = SessionsMachine()
    machine.clients_connect()
    settle(machine)
    return machine


def test_a_publish_resent_after_a_cut_is_acknowledged_but_not_routed_again() -> None:
    machine = connected()
    machine.app_joins_leaves_or_asks_who(1, "chat", Join)
    settle(machine)
    machine.app_publishes(0, "chat")
    machine.bytes_reach_the_server(0, 1 << 20)  # routed; the ack dies with the connection
    machine.connection_is_cut(0, server_knows=True)
    settle(machine)
    assert [entry[2] for entry in machine.apps[1].received] == ["1"]
    assert machine.broker.carried[machine.apps[0].token or ""] == ["1"]


def test_a_join_and_leave_resent_after_a_cut_leave_the_session_out_of_the_room() -> None:
    machine = connected()
    machine.app_joins_leaves_or_asks_who(0, "chat", Join)
    machine.app_joins_leaves_or_asks_who(0, "chat", Leave)
    machine.bytes_reach_the_server(0, 1 << 20)  # both carried out, their acks held
    machine.connection_is_cut(0, server_knows=False)  # half-open: the resume takes over
    settle(machine)
    assert machine.broker.rooms.filters_of(machine.broker.by_name["alice"]) == frozenset()


def test_duplicated_deliveries_and_a_replay_reach_the_application_once() -> None:
    machine = connected()
    machine.app_joins_leaves_or_asks_who(1, "chat", Join)
    settle(machine)
    machine.delivery_frames_are_duplicated(1, 3)
    for _ in range(3):
        machine.app_publishes(0, "chat")
    machine.bytes_reach_the_server(0, 1 << 20)
    machine.bytes_reach_the_client(1, 1 << 20)  # the acks die in the cut: a replay follows
    machine.connection_is_cut(1, server_knows=True)
    settle(machine)
    assert [entry[0] for entry in machine.apps[1].received] == [1, 2, 3]


def test_an_expired_session_starts_over_rejoins_and_sends_the_outbox_again() -> None:
    machine = connected()
    machine.app_joins_leaves_or_asks_who(1, "chat", Join)
    settle(machine)
    machine.connection_is_cut(1, server_knows=True)
    machine.a_detached_session_expires(1)
    machine.app_publishes(1, "news")  # kept in the outbox while disconnected
    settle(machine)
    bob = machine.broker.by_name["bob"]
    assert machine.broker.rooms.filters_of(bob) == {"chat"}
    assert machine.broker.carried[bob.token] == ["3", "2"]  # the rejoin, then the resend


def test_a_flush_over_a_refused_direct_reports_the_refusal() -> None:
    machine = connected()
    machine.app_sends_a_direct(0, myself=False)
    machine.app_flushes(0)
    flush = machine.apps[0].flushes[0][0]
    settle(machine)
    error = flush.error()
    assert error is not None and error.code == "no_such_user"


def test_a_refused_leave_resent_after_a_cut_does_not_undo_the_join_after_it() -> None:
    machine = connected()
    alice = machine.apps[0]
    machine._submit(alice, Leave(room="chat"))  # refused: not_member
    machine._submit(alice, Join(room="chat"))
    machine.bytes_reach_the_server(0, 1 << 20)  # leave refused, join carried out
    machine.connection_is_cut(0, server_knows=False)  # the refusal and the ack are lost
    settle(machine)  # the leave is resent, now carried out: out of the room the app joined


def test_a_publish_carried_out_and_resent_is_not_refused_by_the_rate_limit() -> None:
    machine = SessionsMachine()
    machine.broker.max_msgs_per_sec = 2.0  # a bucket of two
    machine.clients_connect()
    machine.app_joins_leaves_or_asks_who(1, "chat", Join)
    settle(machine)
    machine.app_publishes(0, "chat")
    machine.app_publishes(0, "chat")
    machine.bytes_reach_the_server(0, 1 << 20)
    machine.now += 1.0  # the bucket refills
    machine.app_publishes(0, "chat")
    machine.bytes_reach_the_server(0, 1 << 20)  # all three routed, their acks held
    machine.connection_is_cut(0, server_knows=True)
    settle(machine)  # three resends into a bucket of two: the third is refused
    assert [entry[2] for entry in machine.apps[1].received] == ["1", "2", "3"]
    assert machine.apps[0].refused == set(), "refused, though it was delivered"
