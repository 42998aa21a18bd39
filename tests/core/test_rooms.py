"""Room registry: exact rooms and NATS-style wildcards decide who receives a publish."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from securemsg.core.rooms import (
    MATCH_CACHE_MEMBERS,
    MATCH_CACHE_ROOMS,
    RoomRegistry,
    filter_matches,
    is_wildcard,
)


@pytest.mark.parametrize(
    ("room_filter", "room"),
    [
        ("a", "a"),
        ("a.b", "a.b"),
        ("*", "a"),
        ("a.*", "a.b"),
        ("*.b", "a.b"),
        ("a.*.c", "a.x.c"),
        ("a.>", "a.b"),
        ("a.>", "a.b.c.d"),
        (">", "a"),
        (">", "a.b.c"),
        ("*.>", "a.b"),
    ],
)
def test_a_filter_matches(room_filter: str, room: str) -> None:
    assert filter_matches(room_filter, room)


@pytest.mark.parametrize(
    ("room_filter", "room"),
    [
        ("a", "b"),
        ("a", "a.b"),
        ("a.b", "a"),
        ("*", "a.b"),  # one token only
        ("a.*", "a"),
        ("a.*", "a.b.c"),
        ("a.>", "a"),  # > needs at least one token
        ("*.>", "a"),
        ("a.*.c", "a.x.d"),
        ("a.b", "a.bc"),
    ],
)
def test_a_filter_does_not_match(room_filter: str, room: str) -> None:
    assert not filter_matches(room_filter, room)


def test_is_wildcard() -> None:
    assert is_wildcard("a.*")
    assert is_wildcard(">")
    assert not is_wildcard("a.b")


def test_publish_reaches_exact_and_wildcard_members() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("exact", "s.kitchen.temp")
    rooms.join("star", "s.*.temp")
    rooms.join("tail", "s.>")
    rooms.join("other", "t.>")
    assert set(rooms.match("s.kitchen.temp")) == {"exact", "star", "tail"}
    assert set(rooms.match("s.kitchen.humidity")) == {"tail"}
    assert set(rooms.match("s")) == set()
    assert rooms.match("nobody.here") == ()


def test_a_member_whose_filters_overlap_is_listed_once() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    for room_filter in ("a.b", "a.*", "a.>", ">"):
        assert rooms.join("m", room_filter)
    assert rooms.match("a.b") == ("m",)


def test_joining_twice_is_reported_and_harmless() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    assert rooms.join("m", "a")
    assert not rooms.join("m", "a")
    assert rooms.match("a") == ("m",)
    assert rooms.leave("m", "a")
    assert rooms.match("a") == ()


def test_leave_removes_one_filter_and_reports_a_filter_not_joined() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("m", "a.*")
    rooms.join("m", "a.b")
    assert not rooms.leave("m", "a.>")
    assert not rooms.leave("someone", "a.b")
    assert rooms.leave("m", "a.*")
    assert rooms.match("a.c") == ()
    assert rooms.match("a.b") == ("m",)
    assert rooms.filters_of("m") == frozenset({"a.b"})


def test_leave_all_removes_every_membership() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("m", "b")
    rooms.join("m", "a.>")
    rooms.join("n", "b")
    assert rooms.leave_all("m") == ["a.>", "b"]
    assert rooms.filters_of("m") == frozenset()
    assert rooms.match("b") == ("n",)
    assert rooms.leave_all("m") == []
    assert len(rooms) == 1


def test_match_results_follow_joins_and_leaves() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("a", "x.y")
    assert rooms.match("x.y") == ("a",)
    rooms.join("b", "x.*")
    assert set(rooms.match("x.y")) == {"a", "b"}
    rooms.leave("a", "x.y")
    assert rooms.match("x.y") == ("b",)
    rooms.leave_all("b")
    assert rooms.match("x.y") == ()


def test_members_of_a_concrete_room_include_wildcard_joiners() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("exact", "a.b")
    rooms.join("star", "a.*")
    assert set(rooms.members("a.b")) == {"exact", "star"}


def test_members_of_a_pattern_are_those_who_joined_that_pattern() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("exact", "a.b")
    rooms.join("star", "a.*")
    rooms.join("tail", "a.>")
    assert rooms.members("a.*") == ("star",)
    assert rooms.members("a.>") == ("tail",)
    assert rooms.members("*.*") == ()


def test_len_counts_filters_with_members() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    assert len(rooms) == 0
    rooms.join("m", "a")
    rooms.join("n", "a")
    rooms.join("m", "a.>")
    assert len(rooms) == 2


def test_subscription_count_follows_joins_and_leaves() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    assert rooms.subscription_count("m") == 0
    rooms.join("m", "a")
    rooms.join("m", "a")
    rooms.join("m", "a.>")
    rooms.join("n", "a")
    assert rooms.subscription_count("m") == 2
    rooms.leave("m", "a")
    assert rooms.subscription_count("m") == 1
    rooms.leave_all("m")
    assert rooms.subscription_count("m") == 0


def test_a_room_of_many_tokens_matches_without_recursion_limits() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    room = ".".join(["t"] * 127)
    rooms.join("stars", ".".join(["*"] * 127))
    rooms.join("tail", ".".join(["*"] * 127 + [">"]))
    rooms.join("short", "t.>")
    assert set(rooms.match(room)) == {"stars", "short"}
    assert set(rooms.match(room + ".u")) == {"tail", "short"}


# -- the match cache: bounded, and kept (not wiped) across joins and leaves --------------------


def test_a_join_or_leave_keeps_the_cached_results_it_cannot_change() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("p", "x.a")
    rooms.join("q", "y.b")
    x_a, y_b = rooms.match("x.a"), rooms.match("y.b")
    # A hit returns the cached tuple itself; a recomputed result is a new tuple.
    assert rooms.match("x.a") is x_a
    for room_filter in ("x.c", "x.*", "x.>", "z.*.b", "y.c"):
        rooms.join("r", room_filter)
        assert rooms.match("y.b") is y_b, room_filter
        rooms.leave("r", room_filter)
        assert rooms.match("y.b") is y_b, room_filter
    rooms.join("r", "y.c")
    assert rooms.match("x.a") is x_a
    assert rooms.cache_size == 2


def test_a_join_changes_the_cached_results_it_matches() -> None:
    rooms: RoomRegistry[str] = RoomRegistry()
    rooms.join("p", "x.a")
    assert rooms.match("x.a") == ("p",)
    rooms.join("q", "x.*")
    assert set(rooms.match("x.a")) == {"p", "q"}
    rooms.join("r", "*.a")
    assert set(rooms.match("x.a")) == {"p", "q", "r"}
    rooms.leave("p", "x.a")
    assert set(rooms.match("x.a")) == {"q", "r"}
    rooms.leave("q", "x.*")
    assert rooms.match("x.a") == ("r",)
    rooms.leave("r", "*.a")
    assert rooms.match("x.a") == ()
    rooms.join("p", "x.>")
    rooms.join("q", "x.>")
    assert set(rooms.match("x.a")) == {"p", "q"}
    rooms.leave("p", "x.>")  # another wildcard filter under "x" stays
    assert rooms.match("x.a") == ("q",)


def test_the_cache_holds_at_most_its_bound_of_rooms() -> None:
    rooms: RoomRegistry[int] = RoomRegistry()
    rooms.join(1, "chat.>")
    for i in range(MATCH_CACHE_ROOMS * 2):
        assert rooms.match(f"chat.room{i}") == (1,)
    assert rooms.cache_size == MATCH_CACHE_ROOMS
    assert rooms.cached_members == MATCH_CACHE_ROOMS <= MATCH_CACHE_MEMBERS


def test_the_cache_holds_at_most_its_bound_of_members() -> None:
    rooms: RoomRegistry[int] = RoomRegistry(cache_rooms=100, cache_members=10)
    for member in range(4):
        rooms.join(member, "r.>")
    for member in range(11):
        rooms.join(member, "big")
    assert len(rooms.match("big")) == 11  # larger than the whole budget: not cached
    assert rooms.cache_size == 0
    for i in range(5):
        assert len(rooms.match(f"r.{i}")) == 4
        assert rooms.cached_members <= 10
    assert rooms.cache_size == 2


# -- against a naive model ---------------------------------------------------------------------

MEMBERS = st.sampled_from(["m", "n"])
ALL_ROOMS = [".".join(p) for n in (1, 2, 3) for p in itertools.product("ab", repeat=n)]
FILTERS = st.one_of(
    st.just(">"),
    st.builds(
        lambda tokens, tail: ".".join([*tokens, ">"] if tail else tokens),
        st.lists(st.sampled_from(["a", "a", "b", "*"]), min_size=1, max_size=3),
        st.booleans(),
    ),
)


class RoomsMachine(RuleBasedStateMachine):
    """The trie and its cache answer what scanning every membership answers."""

    def __init__(self) -> None:
        super().__init__()
        # Room for ALL_ROOMS but not for all their members: hits, stale entries and
        # evictions all happen.
        self.rooms: RoomRegistry[str] = RoomRegistry(cache_rooms=16, cache_members=26)
        self.model: dict[str, set[str]] = {}

    def expected(self, room: str) -> set[str]:
        return {
            member
            for member, filters in self.model.items()
            if any(filter_matches(room_filter, room) for room_filter in filters)
        }

    @initialize(memberships=st.lists(st.tuples(MEMBERS, FILTERS), max_size=8))
    def some_joined(self, memberships: list[tuple[str, str]]) -> None:
        # Start among several filters, so that leaves meet the overlaps that stale caches.
        for member, room_filter in memberships:
            self.join(member, room_filter)

    @rule(member=MEMBERS, room_filter=FILTERS)
    def join(self, member: str, room_filter: str) -> None:
        new = room_filter not in self.model.get(member, set())
        assert self.rooms.join(member, room_filter) == new
        self.model.setdefault(member, set()).add(room_filter)

    @rule(member=MEMBERS, room_filter=FILTERS)
    def leave(self, member: str, room_filter: str) -> None:
        joined = room_filter in self.model.get(member, set())
        assert self.rooms.leave(member, room_filter) == joined
        self.model.get(member, set()).discard(room_filter)

    @rule(member=MEMBERS, data=st.data())
    def leave_joined(self, member: str, data: st.DataObject) -> None:
        filters = sorted(self.model.get(member, set()))
        if filters:
            room_filter = data.draw(st.sampled_from(filters))
            assert self.rooms.leave(member, room_filter)
            self.model[member].discard(room_filter)

    @rule(member=MEMBERS)
    def leave_all(self, member: str) -> None:
        assert self.rooms.leave_all(member) == sorted(self.model.pop(member, set()))

    @invariant()
    def every_room_matches_as_the_model_says(self) -> None:
        # Every room, after every step: a stale cached result cannot wait to be asked.
        for room in ALL_ROOMS:
            found = self.rooms.match(room)
            assert len(found) == len(set(found)), room
            assert set(found) == self.expected(room), room
            assert set(self.rooms.members(room)) == self.expected(room), room

    @rule(room_filter=FILTERS)
    def members_of_a_pattern(self, room_filter: str) -> None:
        if is_wildcard(room_filter):
            joiners = {m for m, filters in self.model.items() if room_filter in filters}
            assert set(self.rooms.members(room_filter)) == joiners

    @invariant()
    def counts_agree(self) -> None:
        for member in ("m", "n"):
            filters = self.model.get(member, set())
            assert self.rooms.filters_of(member) == filters
            assert self.rooms.subscription_count(member) == len(filters)
        assert len(self.rooms) == len(set().union(*self.model.values()))

    @invariant()
    def the_cache_stays_bounded(self) -> None:
        assert self.rooms.cache_size <= 16
        assert self.rooms.cached_members <= 26


RoomsMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestRoomsMachine = RoomsMachine.TestCase


def test_leaving_every_filter_leaves_an_empty_trie() -> None:
    rooms: RoomRegistry[int] = RoomRegistry()
    filters = ["a", "a.b", "a.*", "a.>", "*.b.>", ">", "*", "c.*.d"]
    for member, room_filter in enumerate(filters):
        rooms.join(member, room_filter)
        rooms.join(member + 100, room_filter)
    for member in range(len(filters)):
        rooms.leave_all(member)
        rooms.leave_all(member + 100)
    assert len(rooms) == 0
    # Nodes are pruned as their last member leaves, so memory does not grow with churn.
    assert rooms._root.unused()
