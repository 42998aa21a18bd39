"""Broker.publish_datagram: at most once, never pushing back (fake links, no sockets)."""

from __future__ import annotations

import msgspec

from securemsg.core.delivery import message_prefix
from securemsg.core.messages import Delivery, encode
from securemsg.server.broker import Broker
from tests.server.test_broker import open_session


def datagram_prefix(body: bytes = b"1") -> bytes:
    message = Delivery(
        room="sensors.a", sender="probe", body=msgspec.Raw(body), datagram=True, ts=1.0, seq=0
    )
    return message_prefix(encode(message))


def test_a_datagram_publish_is_numbered_and_tagged_for_each_connected_member() -> None:
    broker = Broker()
    session, link, _ = open_session(broker, "dash")
    broker.join(session, "sensors.>")
    link.received()  # (nothing yet)
    assert broker.publish_datagram(datagram_prefix(), "sensors.a") == (1, 0)
    (message,) = link.received()
    assert isinstance(message, Delivery)
    assert (message.datagram, message.seq, message.sender) == (True, 1, "probe")


def test_a_congested_or_disconnected_member_misses_it_and_nobody_is_held_back() -> None:
    broker = Broker(max_pending=4)
    slow, slow_link, _ = open_session(broker, "slow")
    gone, gone_link, _ = open_session(broker, "gone")
    for member in (slow, gone):
        broker.join(member, "sensors.>")
    broker.detach(gone, gone_link, now=0.0)
    results = [broker.publish_datagram(datagram_prefix(), "sensors.a") for _ in range(6)]
    # Two fit before the log is congested (half of max_pending); the rest are missed,
    # never the overflow rule that would end the session.
    assert results == [(1, 1), (1, 1), (0, 2), (0, 2), (0, 2), (0, 2)]
    assert slow_link.closed_with is None
    assert broker.by_name["slow"] is slow
    assert len(gone.delivery) == 0
    assert not broker.stalled
