"""Room registry: exact rooms and NATS-style wildcards decide who receives a publish."""

from __future__ import annotations

import pytest

from securemsg.core.rooms import RoomRegistry, filter_matches, is_wildcard


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


def test_the_match_cache_is_dropped_on_join_and_leave() -> None:
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
