"""The servers a client may connect to, and the order it tries them in, sans-I/O.

Theory of operation. A client is given one address or several (``host1:7443,host2:7443``);
a cluster node's ``welcome`` may advertise more (``nodes``, as NATS advertises
``connect_urls`` in its INFO). :class:`AddressBook` holds them as one ring:

- the **given** addresses first, in the order given, and never dropped: they are the
  user's word for where the service lives;
- then the **learned** ones, those a ``welcome`` advertised that were not given. Each
  ``welcome`` replaces them (a node no longer advertised is forgotten, as NATS forgets the
  servers it only discovered). New ones are put in a random order, so the clients of a node
  that dies do not all move to the same survivor.

Every attempt goes to :attr:`AddressBook.current`; after a failed attempt, and after a
connection that was lost, the client calls :meth:`AddressBook.advance` and tries the next
address of the ring (the one it lost is likely dead). The delays between attempts are the
client's backoff schedule (:mod:`securemsg.core.backoff`), one schedule whatever the address:
rotating does not reset it. The one exception is :func:`moves_at_once`: a node that says it
lost the cluster is alive and sure of it, so the first attempt elsewhere goes without a wait.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

from securemsg.core.messages import BYE_NODE_UNAVAILABLE

__all__ = [
    "MAX_LEARNED",
    "Address",
    "AddressBook",
    "moves_at_once",
    "parse_address",
    "parse_addresses",
]

#: Advertised addresses kept at most: a server cannot grow a client's ring without bound.
MAX_LEARNED: Final = 64


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, default_port: int) -> Address:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address as an :class:`Address`;
    ValueError with one sentence when it is none of these."""
    text = text.strip()
    if not text:
        raise ValueError("an address is empty")
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        return Address(text.strip("[]"), default_port)  # no port, or a bare IPv6 address
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Address(host.strip("[]") or "localhost", int(port))


def parse_addresses(value: str | Iterable[str], *, default_port: int) -> list[Address]:
    """Comma-separated addresses (a string, or strings that may each hold commas), in order,
    without repeats; ValueError when one is not an address or there is none."""
    words = [value] if isinstance(value, str) else list(value)
    found: list[Address] = []
    for word in words:
        for part in word.split(","):
            address = parse_address(part, default_port=default_port)
            if address not in found:
                found.append(address)
    if not found:
        raise ValueError("no address given")
    return found


def moves_at_once(reason: str | None) -> bool:
    """True when a connection that ended for ``reason`` is retried elsewhere at once."""
    return reason == BYE_NODE_UNAVAILABLE


class AddressBook:
    """The ring of addresses a client tries: given ones, then learned ones."""

    __slots__ = ("_current", "_given", "_learned", "_rng")

    def __init__(self, given: Sequence[Address], *, rng: random.Random | None = None) -> None:
        if not given:
            raise ValueError("an address book needs at least one address")
        self._given = list(dict.fromkeys(given))
        self._learned: list[Address] = []
        self._current = self._given[0]
        self._rng = rng or random.Random()

    @property
    def current(self) -> Address:
        """The address of the connection, or of the attempt under way."""
        return self._current

    @property
    def given(self) -> list[Address]:
        return list(self._given)

    @property
    def addresses(self) -> list[Address]:
        """The ring, in the order of attempts: given, then learned."""
        return [*self._given, *self._learned]

    def advance(self) -> Address:
        """Move to the next address of the ring (the same one when it is alone) and return it."""
        ring = self.addresses
        self._current = ring[(ring.index(self._current) + 1) % len(ring)]
        return self._current

    def learn(self, nodes: Iterable[str], *, default_port: int) -> list[Address]:
        """Take the addresses a ``welcome`` advertised as the learned ones; return those new
        to the ring. Addresses that do not parse are skipped (a peer's data never raises).
        The current address stays until the client moves away from it, so the ring always
        holds it (a node advertises itself; one that spells itself otherwise is forgotten
        at the next ``welcome``)."""
        advertised: list[Address] = []
        for text in nodes:
            try:
                address = parse_address(text, default_port=default_port)
            except ValueError:
                continue
            if address not in self._given and address not in advertised:
                advertised.append(address)
        advertised = advertised[:MAX_LEARNED]
        new = [address for address in advertised if address not in self._learned]
        self._rng.shuffle(new)
        current = self._current
        self._learned = [a for a in self._learned if a in advertised or a == current] + new
        return new
