"""The ring of addresses a client tries: parsing, order, rotation, and what welcome teaches."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemsg.core.address import (
    MAX_LEARNED,
    Address,
    AddressBook,
    moves_at_once,
    parse_address,
    parse_addresses,
)
from securemsg.core.messages import BYE_NODE_UNAVAILABLE, BYE_SERVER_SHUTDOWN

A, B, C = Address("a", 1), Address("b", 2), Address("c", 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", Address("host", 7443)),
        ("host:9000", Address("host", 9000)),
        (" host:9000 ", Address("host", 9000)),
        (":9000", Address("localhost", 9000)),
        ("[::1]:9000", Address("::1", 9000)),
        ("[::1]", Address("::1", 7443)),
        ("::1", Address("::1", 7443)),
        ("127.0.0.1:1", Address("127.0.0.1", 1)),
    ],
)
def test_an_address_is_a_host_with_an_optional_port(text: str, expected: Address) -> None:
    assert parse_address(text, default_port=7443) == expected


@pytest.mark.parametrize("text", ["host:0", "host:65536", "host:x", "host:-1", "", "  "])
def test_a_bad_address_is_one_sentence(text: str) -> None:
    with pytest.raises(ValueError, match=r"^('.*': the port must be a number|an address is)"):
        parse_address(text, default_port=7443)


def test_an_ipv6_address_is_shown_in_brackets() -> None:
    assert str(Address("::1", 7443)) == "[::1]:7443"
    assert str(Address("h", 1)) == "h:1"


def test_addresses_come_from_a_comma_string_or_a_list_in_order_without_repeats() -> None:
    expected = [Address("a", 1), Address("b", 9), Address("c", 3)]
    assert parse_addresses("a:1,b, c:3,a:1", default_port=9) == expected
    assert parse_addresses(["a:1", "b", "c:3"], default_port=9) == expected
    assert parse_addresses(["a:1,b", "c:3"], default_port=9) == expected
    with pytest.raises(ValueError, match="an address is empty"):
        parse_addresses("a:1,,b", default_port=9)
    with pytest.raises(ValueError, match="no address given"):
        parse_addresses([], default_port=9)


def test_the_ring_starts_at_the_first_given_address_and_rotates_in_order() -> None:
    book = AddressBook([A, B, C])
    assert book.current == A
    assert [book.advance() for _ in range(4)] == [B, C, A, B]


def test_a_single_address_is_tried_again_and_again() -> None:
    book = AddressBook([A])
    assert [book.advance() for _ in range(3)] == [A, A, A]


def test_an_empty_book_is_refused() -> None:
    with pytest.raises(ValueError):
        AddressBook([])


def test_learned_addresses_follow_the_given_ones_and_given_ones_are_not_repeated() -> None:
    book = AddressBook([A], rng=random.Random(1))
    new = book.learn(["a:1", "b:2", "c:3", "b:2"], default_port=7443)
    assert sorted(new) == [B, C]
    assert book.addresses[0] == A
    assert sorted(book.addresses[1:]) == [B, C]
    assert book.learn(["a:1", "b:2", "c:3"], default_port=7443) == []  # nothing new


def test_new_learned_addresses_are_shuffled_so_clients_spread() -> None:
    orders = set()
    for seed in range(20):
        book = AddressBook([A], rng=random.Random(seed))
        book.learn([f"n{i}:1" for i in range(5)], default_port=1)
        orders.add(tuple(book.addresses[1:]))
    assert len(orders) > 1


def test_a_node_no_longer_advertised_is_forgotten_but_a_given_one_never() -> None:
    book = AddressBook([A, B], rng=random.Random(1))
    book.learn(["c:3", "d:4"], default_port=1)
    book.learn(["d:4"], default_port=1)  # the cluster lost c, and a and b too
    assert book.addresses == [A, B, Address("d", 4)]
    book.learn([], default_port=1)
    assert book.addresses == [A, B]


def test_the_current_address_stays_in_the_ring_until_the_client_moves_away() -> None:
    book = AddressBook([A], rng=random.Random(1))
    book.learn(["b:2"], default_port=1)
    assert book.advance() == B
    book.learn(["c:3"], default_port=1)  # b advertises itself under another name
    assert book.current == B
    assert B in book.addresses
    assert book.advance() == C  # the one after b, not back to the start
    book.learn(["c:3"], default_port=1)
    assert book.addresses == [A, C]


def test_bad_advertised_addresses_are_skipped_and_their_number_is_bounded() -> None:
    book = AddressBook([A], rng=random.Random(1))
    book.learn(["b:99999", "", "c:3"], default_port=1)
    assert book.addresses[1:] == [C]
    book.learn([f"n{i}:1" for i in range(MAX_LEARNED + 50)], default_port=1)
    assert len(book.addresses) == 1 + MAX_LEARNED


def test_only_a_node_that_lost_the_cluster_is_left_at_once() -> None:
    assert moves_at_once(BYE_NODE_UNAVAILABLE)
    assert not moves_at_once(BYE_SERVER_SHUTDOWN)
    assert not moves_at_once("eof")
    assert not moves_at_once(None)


_addresses = st.builds(Address, st.sampled_from("abcdefgh"), st.integers(1, 3))


@given(
    given_addresses=st.lists(_addresses, min_size=1, max_size=4, unique=True),
    steps=st.lists(
        st.one_of(
            st.just("advance"),
            st.lists(_addresses, max_size=6).map(lambda a: [str(x) for x in a]),
        ),
        max_size=30,
    ),
)
def test_the_ring_always_holds_every_given_address_and_the_current_one(
    given_addresses: list[Address], steps: list[str | list[str]]
) -> None:
    book = AddressBook(given_addresses, rng=random.Random(0))
    for step in steps:
        if step == "advance":
            book.advance()
        else:
            book.learn(step, default_port=1)
        ring = book.addresses
        assert ring[: len(given_addresses)] == given_addresses
        assert book.current in ring
        assert len(set(ring)) == len(ring)
        # One turn of the ring reaches every address of it.
        assert {book.advance() for _ in ring} == set(ring)
