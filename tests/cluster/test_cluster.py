"""A cluster of nodes over a real nats-server: everything a client does works across nodes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from securemsg.client.client import connect
from tests.cluster.conftest import StartNode

pytestmark = pytest.mark.timeout(60)


async def client(port: int, name: str, tls_files: Any, **options: Any) -> Any:
    options.setdefault("reconnect_base", 0.05)
    options.setdefault("reconnect_cap", 0.2)
    return await connect("localhost", port, name=name, ca=str(tls_files.ca_pem), **options)


async def test_publish_reaches_members_on_every_node(start_node: StartNode, tls_files: Any) -> None:
    a, b = await start_node(), await start_node()
    alice = await client(a.port, "alice", tls_files)
    bob = await client(b.port, "bob", tls_files)
    carol = await client(b.port, "carol", tls_files)
    try:
        await alice.join("chat.*")
        await bob.join("chat.x")
        await carol.join("chat.x")
        await carol.publish("chat.x", {"n": 1}, confirm=True)
        got_a = await alice.receive(timeout=5)
        got_b = await bob.receive(timeout=5)
        assert (got_a.body, got_a.sender, got_a.room, got_a.seq) == ({"n": 1}, "carol", "chat.x", 1)
        assert (got_b.body, got_b.sender) == ({"n": 1}, "carol")
        with pytest.raises(Exception):
            await carol.receive(timeout=0.3)
    finally:
        await asyncio.gather(alice.close(), bob.close(), carol.close())
