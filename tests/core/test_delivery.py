"""Delivery state: sequence numbers, cumulative acks, replay, dedup and the shared prefix."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemsg.core.delivery import (
    DeliveryLog,
    Inbox,
    Outbox,
    RecentIds,
    message_prefix,
    splice_frame,
    splice_payload,
)
from securemsg.core.frames import HEADER_SIZE, FrameDecoder
from securemsg.core.messages import Delivery, decode_server, encode, encode_frame_of
from securemsg.errors import ProtocolError


def filled_log(count: int, *, max_pending: int = 100) -> DeliveryLog:
    log = DeliveryLog(max_pending)
    for index in range(1, count + 1):
        assert log.append(b"p%d" % index) == index
    return log


# -- DeliveryLog ------------------------------------------------------------------------------


def test_a_delivery_log_numbers_messages_from_one() -> None:
    log = filled_log(3)
    assert (log.last_seq, log.acked, len(log)) == (3, 0, 3)


def test_a_cumulative_ack_drops_everything_up_to_it() -> None:
    log = filled_log(5)
    log.ack(3)
    assert (log.acked, len(log)) == (3, 2)
    assert list(log.replay(3)) == [(4, b"p4"), (5, b"p5")]


def test_an_old_or_repeated_ack_changes_nothing() -> None:
    log = filled_log(5)
    log.ack(3)
    log.ack(2)
    log.ack(3)
    log.ack(0)
    assert (log.acked, len(log)) == (3, 2)


def test_an_ack_beyond_the_last_seq_sent_is_a_protocol_error() -> None:
    log = filled_log(2)
    with pytest.raises(ProtocolError) as info:
        log.ack(3)
    assert info.value.code == "bad_message"
    assert (log.acked, len(log)) == (0, 2)


def test_replay_returns_the_messages_after_last_seq_and_acks_the_rest() -> None:
    log = filled_log(4)
    assert list(log.replay(1)) == [(2, b"p2"), (3, b"p3"), (4, b"p4")]
    assert log.acked == 1
    assert list(log.replay(0)) == [(2, b"p2"), (3, b"p3"), (4, b"p4")]
    assert list(log.replay(4)) == []
    assert len(log) == 0


def test_replay_after_a_last_seq_the_log_never_reached_returns_nothing() -> None:
    log = filled_log(2)
    assert list(log.replay(9)) == []
    assert log.acked == 2


def test_numbering_continues_after_a_replay() -> None:
    log = filled_log(2)
    list(log.replay(2))
    assert log.append(b"p3") == 3


def test_a_delivery_log_is_full_at_max_pending_until_acked() -> None:
    log = filled_log(3, max_pending=3)
    assert log.full
    log.ack(1)
    assert not log.full
    log.append(b"p4")
    assert log.full


# -- shared prefix ----------------------------------------------------------------------------

MESSAGES = [
    Delivery(room="chat", sender="alice", body=msgspec.Raw(b'{"a":1}'), ts=1.25, seq=0),
    Delivery(
        room="a.b",
        sender="bob",
        body=msgspec.Raw(b'"x"'),
        id="7",
        reply_to="r1",
        ts=1700000000.123,
        seq=0,
    ),
    Delivery(sender="carol", to="dave", body=msgspec.Raw(b"[]"), re="r1", ts=0.0, seq=0),
]


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("seq", [1, 9, 10, 12345, 2**53])
def test_a_spliced_frame_is_exactly_the_encoded_message_with_its_seq(
    message: Delivery, seq: int
) -> None:
    prefix = message_prefix(encode(message))
    frame = splice_frame(prefix, seq)
    assert frame == encode_frame_of(msgspec.structs.replace(message, seq=seq))
    assert splice_payload(prefix, seq) == frame[HEADER_SIZE:]
    assert encode(message)[:-2] == prefix  # what Broker.publish takes for message_prefix
    (payload,) = FrameDecoder().feed(frame)
    decoded = decode_server(payload)
    assert isinstance(decoded, Delivery)
    assert decoded.seq == seq


def test_message_prefix_refuses_a_payload_not_encoded_with_seq_zero() -> None:
    with pytest.raises(ValueError):
        message_prefix(encode(msgspec.structs.replace(MESSAGES[0], seq=3)))


# -- RecentIds --------------------------------------------------------------------------------


def test_recent_ids_remember_an_id_once() -> None:
    recent = RecentIds(window=3)
    assert not recent.seen("a")
    assert recent.seen("a")
    assert len(recent) == 1


def test_recent_ids_remember_at_least_the_window_and_forget_what_is_older_than_twice_it() -> None:
    recent = RecentIds(window=2)
    for msg_id in "abcdef":
        assert not recent.seen(msg_id)
        assert 1 <= len(recent) <= 4
    assert recent.seen("e") and recent.seen("f")  # the last window: always remembered
    assert not recent.seen("a")  # older than twice the window: a resend this late is new


def test_recent_ids_forget_an_id_on_request() -> None:
    recent = RecentIds(window=2)
    for msg_id in "abc":
        recent.seen(msg_id)
    recent.forget("a")  # in the previous generation
    recent.forget("c")  # in the current one
    assert not recent.seen("a") and not recent.seen("c")


# -- Inbox ------------------------------------------------------------------------------------


def test_an_inbox_accepts_new_messages_and_drops_replayed_ones() -> None:
    inbox = Inbox()
    assert [inbox.accept(seq) for seq in (1, 2, 3)] == [True, True, True]
    assert [inbox.accept(seq) for seq in (2, 3, 4)] == [False, False, True]
    assert inbox.last_seq == 4


def test_acks_are_batched_one_for_many_messages() -> None:
    inbox = Inbox()
    assert inbox.ack_due() is None
    for seq in (1, 2, 3):
        inbox.accept(seq)
    assert inbox.ack_due() == 3
    assert inbox.ack_due() is None
    inbox.accept(4)
    assert inbox.ack_due() == 4


def test_an_inbox_acknowledges_up_to_before_the_oldest_message_not_taken() -> None:
    inbox = Inbox()
    for seq in (1, 2, 3, 4):
        inbox.accept(seq)
    assert inbox.ack_due(1) is None
    assert inbox.ack_due(3) == 2
    assert inbox.ack_due(3) is None
    assert inbox.ack_due(None) == 4


def test_an_inbox_reset_numbers_from_one_again() -> None:
    inbox = Inbox()
    inbox.accept(1)
    inbox.accept(2)
    inbox.ack_due()
    inbox.reset()
    assert inbox.accept(1)
    assert inbox.ack_due() == 1


@given(st.lists(st.integers(min_value=1, max_value=30), max_size=40))
def test_an_inbox_delivers_each_seq_at_most_once_in_increasing_order(seqs: list[int]) -> None:
    inbox = Inbox()
    delivered = [seq for seq in seqs if inbox.accept(seq)]
    assert delivered == sorted(set(delivered))
    assert inbox.last_seq == (delivered[-1] if delivered else 0)


# -- Outbox -----------------------------------------------------------------------------------


def test_an_outbox_keeps_frames_in_send_order_until_acked() -> None:
    outbox = Outbox(max_outbox=10)
    ids = [outbox.new_id() for _ in range(3)]
    assert len(set(ids)) == 3
    for msg_id in ids:
        outbox.add(msg_id, msg_id.encode())
    assert outbox.ack(ids[1])
    assert outbox.unacked() == [ids[0].encode(), ids[2].encode()]
    assert not outbox.ack(ids[1])
    assert not outbox.ack("unknown")
    assert len(outbox) == 2


def test_an_outbox_acks_many_ids_at_once_as_it_acks_each() -> None:
    outbox = Outbox(max_outbox=10)
    ids = [outbox.new_id() for _ in range(4)]
    for msg_id in ids:
        outbox.add(msg_id, msg_id.encode() * 3)
    outbox.ack_all([ids[0], ids[2], "unknown", ids[0]])  # unknown and repeated ids: no effect
    assert outbox.unacked() == [ids[1].encode() * 3, ids[3].encode() * 3]
    assert outbox.bytes == len(ids[1]) * 3 + len(ids[3]) * 3
    outbox.ack_all(ids)
    assert (len(outbox), outbox.bytes) == (0, 0)


def test_an_outbox_is_full_at_max_outbox() -> None:
    outbox = Outbox(max_outbox=2)
    outbox.add(outbox.new_id(), b"1")
    assert not outbox.full
    second = outbox.new_id()
    outbox.add(second, b"2")
    assert outbox.full
    outbox.ack(second)
    assert not outbox.full


def test_a_full_delivery_log_takes_no_more_and_says_so_with_seq_zero() -> None:
    log = filled_log(2, max_pending=2)
    assert log.append(b"p3") == 0
    assert (log.last_seq, len(log)) == (2, 2)
    log.ack(1)
    assert log.append(b"p3") == 3


def test_messages_on_their_way_count_toward_congestion_until_both_are_down_to_a_quarter() -> None:
    # A cluster node's unread stream: half way counting it; relieved once the pending and
    # what may still come (lowered by the caller as it arrives) are down to a quarter.
    log = DeliveryLog(max_pending=100)
    for _ in range(10):
        log.append(b"m")
    assert not log.press(39)  # 10 + 39 < 50
    assert log.press(40) and log.congested and log.coming == 40
    assert not log.ack(1)  # 9 pending, but 40 may come: 49 > 25
    assert not log.settle(41)  # more than counted: nothing changes
    assert not log.settle(20) and log.coming == 20  # the node read on: 9 + 20 > 25
    assert log.ack(5)  # 5 + 20 <= 25
    assert not log.congested and log.coming == 0
    for _ in range(50):
        log.append(b"m")
    assert log.congested and log.coming == 0  # the usual rule, unchanged
    assert log.ack(log.last_seq - 25)


def test_a_pressed_log_is_relieved_when_the_node_catches_up_without_another_ack() -> None:
    log = DeliveryLog(max_pending=100)
    for _ in range(10):
        log.append(b"m")
    log.ack(10)  # all acknowledged: no ack will come again until something arrives
    assert log.press(60)
    assert not log.settle(30)  # 0 + 30 > 25
    assert log.settle(25) and not log.congested and log.coming == 0
