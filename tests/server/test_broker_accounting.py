"""The broker's count of what disconnected sessions hold (``disconnected_bytes``, bounded by
``max_disconnected_bytes``) against the truth, after any run of connects, resumes,
disconnects, publishes, acks, expiries, takeovers and evictions: a drift either way would
either let abandoned sessions grow without bound or evict sessions for bytes nobody holds."""

from __future__ import annotations

import msgspec
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from securemsg.core.messages import PROTOCOL_VERSION, Hello, Publish
from securemsg.core.server_session import ServerSession
from securemsg.server.broker import Broker, Link
from tests.server.test_broker import FakeLink

NAMES = ("alice", "bob", "carol")
Names = st.sampled_from(NAMES)


class DisconnectedBytes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.broker = Broker(
            max_pending=6, max_pending_bytes=2_000, max_disconnected_bytes=900, max_sessions=3
        )
        self.now = 0.0
        self.sent = 0
        #: name -> (session, its link or None when disconnected)
        self.clients: dict[str, tuple[ServerSession[Link], FakeLink | None]] = {}

    def _alive(self, name: str) -> ServerSession[Link] | None:
        held = self.clients.get(name)
        if held is None or self.broker.by_token.get(held[0].token) is not held[0]:
            return None
        return held[0]

    @rule(name=Names, resume=st.booleans())
    def connect(self, name: str, resume: bool) -> None:
        held = self.clients.get(name)
        if held is not None and held[1] is not None:
            return  # connected: a second hello would be name_taken
        token = held[0].token if held is not None and resume else None
        last_seq = held[0].delivery.acked if held is not None else 0
        link = FakeLink()
        hello = Hello(version=PROTOCOL_VERSION, name=name, session=token, last_seq=last_seq)
        opened = self.broker.open(hello, identity=None, link=link, now=self.now)
        self.broker.join(opened.session, "room")
        self.clients[name] = (opened.session, link)

    @rule(name=Names)
    def disconnect(self, name: str) -> None:
        held = self.clients.get(name)
        if held is None or held[1] is None:
            return
        self.broker.detach(held[0], held[1], self.now)
        self.clients[name] = (held[0], None)

    @rule(name=Names, size=st.integers(min_value=1, max_value=300))
    def publish(self, name: str, size: int) -> None:
        held = self.clients.get(name)
        if held is None or held[1] is None or self._alive(name) is None:
            return
        self.sent += 1
        body = msgspec.Raw(b'"' + b"x" * size + b'"')
        self.broker.publish(held[0], Publish(room="room", body=body, id=str(self.sent)), 1.0)

    @rule(name=Names)
    def ack_all(self, name: str) -> None:
        held = self.clients.get(name)
        if held is None or held[1] is None or self._alive(name) is None:
            return
        held[0].delivery.ack(held[0].delivery.last_seq)

    @rule(name=Names)
    def expire(self, name: str) -> None:
        session = self._alive(name)
        if session is not None and self.clients[name][1] is None:
            self.broker.end(session, reason="expired")

    @rule(seconds=st.floats(min_value=0.1, max_value=30))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def the_count_is_the_truth(self) -> None:
        broker = self.broker
        truth = sum(
            session.delivery.pending_bytes + dedup for session, dedup in broker.disconnected.items()
        )
        assert broker.disconnected_bytes == truth
        assert broker.disconnected_bytes <= broker.max_disconnected_bytes
        for session in broker.disconnected:
            assert session.link is None
            assert broker.by_token.get(session.token) is session


DisconnectedBytes.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_disconnected_bytes = DisconnectedBytes.TestCase
