"""Room registry and wildcard matching, sans-I/O: who receives a message.

Members join room *filters*: a concrete room (``sensors.kitchen.temp``) or a pattern where
``*`` matches exactly one token and a final ``>`` matches one or more tokens, as in NATS.
:meth:`RoomRegistry.match` answers "who receives a publish to this concrete room"; a member
whose several filters match is listed once. Results are cached per room and the cache is
dropped on any membership change, since joins are rare next to publishes.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["RoomRegistry", "filter_matches", "is_wildcard"]

M = TypeVar("M", bound=Hashable)


def is_wildcard(room_filter: str) -> bool:
    return "*" in room_filter or ">" in room_filter


def filter_matches(room_filter: str, room: str) -> bool:
    """Does ``room_filter`` (maybe with wildcards) match the concrete ``room``?"""
    return _tokens_match(room_filter.split("."), room.split("."))


def _tokens_match(pattern: list[str], tokens: list[str]) -> bool:
    for index, part in enumerate(pattern):
        if part == ">":
            return len(tokens) > index
        if index >= len(tokens):
            return False
        if part != "*" and part != tokens[index]:
            return False
    return len(tokens) == len(pattern)


class RoomRegistry(Generic[M]):
    def __init__(self) -> None:
        self._exact: dict[str, set[M]] = {}
        self._wild: dict[str, tuple[list[str], set[M]]] = {}
        self._by_member: dict[M, set[str]] = {}
        self._cache: dict[str, tuple[M, ...]] = {}

    def join(self, member: M, room_filter: str) -> bool:
        """Add a membership; False when it was already there."""
        filters = self._by_member.setdefault(member, set())
        if room_filter in filters:
            return False
        filters.add(room_filter)
        if is_wildcard(room_filter):
            entry = self._wild.setdefault(room_filter, (room_filter.split("."), set()))
            entry[1].add(member)
        else:
            self._exact.setdefault(room_filter, set()).add(member)
        self._cache.clear()
        return True

    def leave(self, member: M, room_filter: str) -> bool:
        """Remove a membership; False when the member had not joined that filter."""
        filters = self._by_member.get(member)
        if not filters or room_filter not in filters:
            return False
        filters.discard(room_filter)
        if not filters:
            del self._by_member[member]
        if is_wildcard(room_filter):
            _, members = self._wild[room_filter]
            members.discard(member)
            if not members:
                del self._wild[room_filter]
        else:
            members_set = self._exact[room_filter]
            members_set.discard(member)
            if not members_set:
                del self._exact[room_filter]
        self._cache.clear()
        return True

    def leave_all(self, member: M) -> list[str]:
        """Remove every membership of ``member``; returns the filters it had."""
        filters = sorted(self._by_member.get(member, ()))
        for room_filter in filters:
            self.leave(member, room_filter)
        return filters

    def filters_of(self, member: M) -> frozenset[str]:
        return frozenset(self._by_member.get(member, ()))

    def match(self, room: str) -> tuple[M, ...]:
        """Every member that receives a publish to the concrete ``room``, each once."""
        cached = self._cache.get(room)
        if cached is not None:
            return cached
        found: set[M] = set(self._exact.get(room, ()))
        if self._wild:
            tokens = room.split(".")
            for pattern, members in self._wild.values():
                if _tokens_match(pattern, tokens):
                    found.update(members)
        result = tuple(found)
        self._cache[room] = result
        return result

    def members(self, room_filter: str) -> tuple[M, ...]:
        """Who is in ``room_filter``: receivers of a concrete room, or joiners of a pattern."""
        if is_wildcard(room_filter):
            entry = self._wild.get(room_filter)
            return tuple(entry[1]) if entry else ()
        return self.match(room_filter)

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)
