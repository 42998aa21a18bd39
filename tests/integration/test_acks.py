"""An ``ack`` means delivered to the application (docs/protocol.md, section 5): the client
acknowledges what ``receive()`` and ``async for`` took, not what arrived, so messages that
wait in a client's queue stay with the server until they are taken."""

from __future__ import annotations

import asyncio
from typing import Any

from securemsg.client.client import Client
from securemsg.core.messages import Delivery
from securemsg.server.server import Server
from tests.integration.conftest import OpenClient, StartServer


async def until(check: Any, unit: float, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(unit / 10)
    raise AssertionError(f"never: {what}")


def server_acked(server: Server, name: str) -> int:
    return server.broker.by_name[name].delivery.acked  # type: ignore[no-any-return]


async def ten_waiting(server: Server, open_client: OpenClient, unit: float) -> Client:
    """bob with ten messages of alice's received and none taken yet."""
    bob = await open_client(server.port, "bob")
    await bob.join("chat")
    alice = await open_client(server.port, "alice")
    for n in range(10):
        await alice.publish("chat", n)
    await alice.flush(timeout=50 * unit)
    inbox = bob._mailbox.session.inbox
    await until(lambda: inbox.last_seq == 10, unit, "bob received all ten")
    return bob


async def test_only_what_the_application_took_is_acknowledged(
    start_server: StartServer, open_client: OpenClient, unit: float
) -> None:
    server = await start_server()
    bob = await ten_waiting(server, open_client, unit)
    await asyncio.sleep(5 * unit)  # time for an ack, were one sent on arrival
    assert server_acked(server, "bob") == 0
    assert [(await bob.receive(timeout=unit)).body for _ in range(3)] == [0, 1, 2]
    # Done with the first two; the third is in hand until the application asks for more.
    await until(lambda: server_acked(server, "bob") == 2, unit, "the server got ack 2")
    async for message in bob:
        if message.body == 9:
            break
    await until(lambda: server_acked(server, "bob") == 9, unit, "the server got ack 9")
    assert bob._mailbox.take() is None  # asks for more: done with the last one too
    await until(lambda: server_acked(server, "bob") == 10, unit, "the server got ack 10")


async def test_what_was_received_and_not_taken_is_replayed_to_the_session_after_a_crash(
    start_server: StartServer, open_client: OpenClient, raw: Any, unit: float
) -> None:
    server = await start_server()
    bob = await ten_waiting(server, open_client, unit)
    assert [(await bob.receive(timeout=unit)).body for _ in range(3)] == [0, 1, 2]
    await until(lambda: server_acked(server, "bob") == 2, unit, "the server got ack 2")
    # The process dies while it handles the third: no bye, no more acks; its successor
    # resumes from what the application was done with, and gets the third again.
    token = bob.session
    assert bob._task is not None and bob._mailbox.conn is not None
    bob._task.cancel()
    bob._mailbox.conn.abort("crashed")
    again = await raw(server.port, "bob", session=token, last_seq=2)
    assert again.welcome.resumed
    replayed = [await again.recv_type(Delivery) for _ in range(8)]
    assert [(m.seq, bytes(m.body)) for m in replayed] == [(n + 1, b"%d" % n) for n in range(2, 10)]


async def test_a_resumed_client_hands_each_message_over_once_and_acks_as_taken(
    start_server: StartServer, open_client: OpenClient, unit: float
) -> None:
    server = await start_server()
    bob = await ten_waiting(server, open_client, unit)
    assert (await bob.receive(timeout=unit)).body == 0
    assert bob._mailbox.conn is not None
    bob._mailbox.conn.abort("test")  # resumes from seq 1: the server replays 2..10
    changes = bob.state_changes()
    async with asyncio.timeout(50 * unit):
        async for change in changes:
            if type(change).__name__ == "Reconnected":
                assert change.resumed  # type: ignore[attr-defined]
                break
    rest = [(await bob.receive(timeout=unit)).body for _ in range(9)]
    assert rest == list(range(1, 10))  # the replay overlap was dropped
    assert bob._mailbox.take() is None  # done with the last one
    await until(lambda: server_acked(server, "bob") == 10, unit, "the server got ack 10")
