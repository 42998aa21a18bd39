"""Room registry and wildcard matching, sans-I/O: who receives a message.

Members join room *filters*: a concrete room (``sensors.kitchen.temp``) or a pattern where
``*`` matches exactly one token and a final ``>`` matches one or more tokens, as in NATS.
:meth:`RoomRegistry.match` answers "who receives a publish to this concrete room"; a member
whose several filters match is listed once.

The shape is nats-server's sublist (``server/sublist.go``): filters live in a token trie, one
level per token, each node holding its literal children, its ``*`` child, its ``>`` child and
the members who joined the filter that ends there. A join or a leave walks one path, O(tokens
of the filter). A match visits only the nodes whose path matches the room's leading tokens
(one literal child, the ``*`` and the ``>`` child per node visited), so its cost is the tokens
of the room times the filter prefixes that still match, plus the result; a filter that parts
from the room at its first token is never looked at.

Match results are cached per room in a bounded cache (:data:`MATCH_CACHE_ROOMS` rooms and
:data:`MATCH_CACHE_MEMBERS` members summed over the results, oldest evicted first; a result
larger than :data:`MATCH_UNCACHED_RESULT` is not cached): about 3.5 MiB at most, with rooms
of 255 characters). A membership change never empties the cache and never walks it:

- a concrete filter can change the result of its own room only: that one entry is dropped
  (not edited: results list each member once, so whether a leaving member still receives
  that room through another filter is the match's to say);
- a wildcard filter whose first token is a literal ``t`` can change rooms that start with
  ``t`` only: ``t`` gets a fresh stamp, and an entry cached under an older stamp of ``t`` is
  recomputed at its next lookup;
- a filter that starts with ``*`` or ``>`` can change any room: the stamp for all is renewed.

nats instead adds a new subscription to (or removes it from) every cached result it matches,
which scans the whole cache for each wildcard subscription; a client joining and leaving a
wildcard filter in a loop would then cost the server O(cache) per frame. Here a join costs
its tokens whatever the cache holds; the most a client can do by churning wildcard filters is
keep cold the entries under one first token (or all, with a leading wildcard), so those
publishes pay a trie walk, O(tokens) as above.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = [
    "MATCH_CACHE_MEMBERS",
    "MATCH_CACHE_ROOMS",
    "MATCH_UNCACHED_RESULT",
    "RoomRegistry",
    "filter_matches",
    "is_wildcard",
]

M = TypeVar("M", bound=Hashable)

#: Rooms whose match result is cached at most.
MATCH_CACHE_ROOMS = 4_096
#: Members summed over all cached results at most (one pointer each, 8 bytes).
MATCH_CACHE_MEMBERS = 65_536
#: A result with more members is not cached: delivering it costs more than the walk.
MATCH_UNCACHED_RESULT = 4_096


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


class _Node(Generic[M]):
    """One token of one or more filters: what follows it, and who joined the filter ending here."""

    __slots__ = ("children", "members", "star", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[M]] = {}
        self.star: _Node[M] | None = None
        self.tail: _Node[M] | None = None
        self.members: set[M] = set()

    def child(self, token: str) -> _Node[M] | None:
        if token == "*":
            return self.star
        if token == ">":
            return self.tail
        return self.children.get(token)

    def add_child(self, token: str) -> _Node[M]:
        node: _Node[M] = _Node()
        if token == "*":
            self.star = node
        elif token == ">":
            self.tail = node
        else:
            self.children[token] = node
        return node

    def remove_child(self, token: str) -> None:
        if token == "*":
            self.star = None
        elif token == ">":
            self.tail = None
        else:
            del self.children[token]

    def unused(self) -> bool:
        return not (self.members or self.children or self.star or self.tail)


# A cached result, with what it was computed under: (members, first token, its stamp, all's).
_Entry = tuple[tuple[M, ...], str, int, int]


class RoomRegistry(Generic[M]):
    def __init__(
        self, *, cache_rooms: int = MATCH_CACHE_ROOMS, cache_members: int = MATCH_CACHE_MEMBERS
    ) -> None:
        if cache_rooms < 1 or cache_members < 1:
            raise ValueError("the match cache needs room for at least one result")
        self._cache_rooms = cache_rooms
        self._cache_members = cache_members
        # A result larger than the whole budget would evict everything and still not fit.
        self._cacheable = min(MATCH_UNCACHED_RESULT, cache_members)
        self._root: _Node[M] = _Node()
        self._by_member: dict[M, set[str]] = {}
        self._filters = 0  # nodes with members
        self._cache: OrderedDict[str, _Entry[M]] = OrderedDict()
        self._cached_members = 0
        self._clock = 0  # source of fresh stamps, never reused
        self._stamp_all = 0
        # First token of wildcard filters -> [memberships under it, its stamp]. An entry goes
        # when its count does: a result cached while no such filter existed is right again.
        self._wild_first: dict[str, list[int]] = {}

    # -- membership ---------------------------------------------------------------------------

    def join(self, member: M, room_filter: str) -> bool:
        """Add a membership; False when it was already there."""
        filters = self._by_member.get(member)
        if filters is None:
            filters = self._by_member[member] = set()
        elif room_filter in filters:
            return False
        filters.add(room_filter)
        node = self._root
        for token in room_filter.split("."):
            node = node.child(token) or node.add_child(token)
        if not node.members:
            self._filters += 1
        node.members.add(member)
        self._changed(room_filter, joined=True)
        return True

    def leave(self, member: M, room_filter: str) -> bool:
        """Remove a membership; False when the member had not joined that filter."""
        filters = self._by_member.get(member)
        if not filters or room_filter not in filters:
            return False
        filters.discard(room_filter)
        if not filters:
            del self._by_member[member]
        path: list[tuple[_Node[M], str]] = []
        node = self._root
        for token in room_filter.split("."):
            following = node.child(token)
            if following is None:  # cannot happen: _by_member and the trie agree
                raise AssertionError(f"filter {room_filter!r} missing from the trie")
            path.append((node, token))
            node = following
        node.members.discard(member)
        if not node.members:
            self._filters -= 1
        for parent, token in reversed(path):
            if not node.unused():
                break
            parent.remove_child(token)
            node = parent
        self._changed(room_filter, joined=False)
        return True

    def leave_all(self, member: M) -> list[str]:
        """Remove every membership of ``member``; returns the filters it had."""
        filters = sorted(self._by_member.get(member, ()))
        for room_filter in filters:
            self.leave(member, room_filter)
        return filters

    def filters_of(self, member: M) -> frozenset[str]:
        return frozenset(self._by_member.get(member, ()))

    def subscription_count(self, member: M) -> int:
        """How many filters ``member`` has joined, in O(1) (for a per-session limit)."""
        filters = self._by_member.get(member)
        return len(filters) if filters is not None else 0

    # -- lookups ------------------------------------------------------------------------------

    def match(self, room: str) -> tuple[M, ...]:
        """Every member that receives a publish to the concrete ``room``, each once."""
        entry = self._cache.get(room)
        if entry is not None:
            result, first, stamp, stamp_all = entry
            if stamp_all == self._stamp_all:
                wild = self._wild_first.get(first)
                if (0 if wild is None else wild[1]) == stamp:
                    return result
            self._forget(room)
        return self._compute(room)

    def members(self, room_filter: str) -> tuple[M, ...]:
        """Who is in ``room_filter``: receivers of a concrete room, or joiners of a pattern."""
        if not is_wildcard(room_filter):
            return self.match(room_filter)
        node = self._root
        for token in room_filter.split("."):
            following = node.child(token)
            if following is None:
                return ()
            node = following
        return tuple(node.members)

    @property
    def cache_size(self) -> int:
        """Rooms whose result is cached now (at most ``cache_rooms``)."""
        return len(self._cache)

    @property
    def cached_members(self) -> int:
        """Members summed over the cached results (at most ``cache_members``)."""
        return self._cached_members

    def __len__(self) -> int:
        return self._filters

    # -- internals ----------------------------------------------------------------------------

    def _walk(self, tokens: list[str]) -> list[set[M]]:
        """The member sets of every filter that matches ``tokens``, without recursion."""
        found: list[set[M]] = []
        level: list[_Node[M]] = [self._root]
        for token in tokens:
            following: list[_Node[M]] = []
            for node in level:
                if node.tail is not None:
                    found.append(node.tail.members)
                child = node.children.get(token)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            level = following
            if not level:
                break
        found.extend(node.members for node in level)
        return found

    def _compute(self, room: str) -> tuple[M, ...]:
        tokens = room.split(".")
        sets = [members for members in self._walk(tokens) if members]
        if not sets:
            result: tuple[M, ...] = ()
        elif len(sets) == 1:
            result = tuple(sets[0])
        else:
            result = tuple(set().union(*sets))
        if len(result) <= self._cacheable:
            self._remember(room, result, tokens[0])
        return result

    def _remember(self, room: str, result: tuple[M, ...], first: str) -> None:
        cache = self._cache
        # Bounded: each pass evicts one entry, and an empty cache fits any cacheable result.
        while cache and (
            len(cache) >= self._cache_rooms
            or self._cached_members + len(result) > self._cache_members
        ):
            _, evicted = cache.popitem(last=False)
            self._cached_members -= len(evicted[0])
        wild = self._wild_first.get(first)
        cache[room] = (result, first, 0 if wild is None else wild[1], self._stamp_all)
        self._cached_members += len(result)

    def _forget(self, room: str) -> None:
        entry = self._cache.pop(room, None)
        if entry is not None:
            self._cached_members -= len(entry[0])

    def _changed(self, room_filter: str, *, joined: bool) -> None:
        """Make the cache right after a membership of ``room_filter`` changed, in O(1)."""
        if not is_wildcard(room_filter):
            self._forget(room_filter)
            return
        self._clock += 1
        first = room_filter.partition(".")[0]
        if first in ("*", ">"):
            self._stamp_all = self._clock
            return
        wild = self._wild_first.get(first)
        if joined:
            if wild is None:
                self._wild_first[first] = [1, self._clock]
            else:
                wild[0] += 1
                wild[1] = self._clock
        elif wild is not None:
            if wild[0] > 1:
                wild[0] -= 1
                wild[1] = self._clock
            else:
                del self._wild_first[first]
