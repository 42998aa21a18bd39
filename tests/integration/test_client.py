"""The asyncio client against real servers over TLS on 127.0.0.1.

Connection faults come from :class:`tests.faults.FaultProxy` (refuse, cut, black-hole) or from
stopping a server and starting another on the same port.
"""

from __future__ import annotations

import asyncio
import builtins
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from securemsg.client.client import (
    Client,
    ClientState,
    Closed,
    Disconnected,
    Presence,
    Reconnected,
    Reconnecting,
    StateChange,
    connect,
)
from securemsg.errors import (
    AuthError,
    ClosedError,
    ConnectError,
    RejectedError,
    TimeoutError,
    TLSError,
)
from tests.faults import FaultProxy

pytestmark = pytest.mark.timeout(30)

OpenClient = Callable[..., Awaitable[Client]]
E = TypeVar("E", bound=StateChange)


async def next_event(changes: AsyncIterator[StateChange], kind: type[E], within: float) -> E:
    """Skip state changes until one of ``kind``."""
    async with asyncio.timeout(within):
        async for change in changes:
            if isinstance(change, kind):
                return change
    raise AssertionError(f"no {kind.__name__} before the stream ended")


async def bodies(client: Client, count: int, within: float = 2.0) -> list[Any]:
    return [(await client.receive(within)).body for _ in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- messaging -------------------------------------------------------------------------------


async def test_two_clients_join_publish_and_receive(start_server, open_client) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    bob = await open_client(server.port, "bob")
    assert (alice.state, alice.name) == (ClientState.CONNECTED, "alice") and alice.session
    await bob.join("chat")
    await alice.publish("chat", {"text": "hi"})
    message = await bob.receive(timeout=1)
    assert (message.room, message.sender, message.to) == ("chat", "alice", None)
    assert message.body == {"text": "hi"} and message.seq == 1 and message.time > 0
    await alice.publish("chat", [2])
    async for message in bob:
        assert message.body == [2]
        break


async def test_direct_reaches_the_named_client_and_an_unknown_name_is_rejected(
    start_server, open_client
) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    bob = await open_client(server.port, "bob")
    await alice.direct("bob", "psst", confirm=True)
    message = await bob.receive(timeout=1)
    assert (message.to, message.room, message.sender, message.body) == (
        "bob",
        None,
        "alice",
        "psst",
    )
    with pytest.raises(RejectedError) as caught:
        await alice.direct("nobody", 1, confirm=True, timeout=1)
    assert caught.value.code == "no_such_user"
    assert alice.unacknowledged == 0


async def test_request_is_answered_by_reply_which_never_reaches_receive(
    start_server, open_client, unit
) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    service = await open_client(server.port, "service")
    await service.join("math.double")

    async def serve() -> None:
        request = await service.receive(timeout=1)
        assert request.reply_to is not None
        await service.reply(request, request.body * 2)

    serving = asyncio.create_task(serve())
    answer = await alice.request("math.double", 21, timeout=1)
    await serving
    assert answer.body == 42 and answer.sender == "service" and answer.re is not None
    with pytest.raises(TimeoutError):
        await alice.receive(timeout=2 * unit)


async def test_a_client_that_receives_messages_close_together_keeps_its_loop_polling(
    start_server, open_client
) -> None:
    # The window opens only when messages come within busy_poll_us of each other (1 ms here):
    # a request/reply exchange does, one message at a time.
    server = await start_server()
    alice = await open_client(server.port, "alice", busy_poll_us=0)
    bob = await open_client(server.port, "bob", busy_poll_us=1000)
    assert alice._mailbox.conn is not None and alice._mailbox.conn.busy_poll is None
    poll = bob._mailbox.conn.busy_poll if bob._mailbox.conn is not None else None
    assert poll is not None and poll.window == 0
    await bob.join("echo")
    widest, spinning = 0.0, 0
    for n in range(50):
        await alice.publish("echo", n)
        assert (await bob.receive(timeout=5)).body == n
        widest = max(widest, poll.window)
        spinning += poll.active
    assert 0 < widest <= 1e-3, widest
    assert spinning, "the loop never polled after a message"


async def test_request_times_out_cleanly_when_nobody_answers(
    start_server, open_client, unit
) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"request to 'nobody\.home'") as caught:
        await alice.request("nobody.home", "anyone?", timeout=3 * unit)
    assert isinstance(caught.value, builtins.TimeoutError)
    assert time.monotonic() - started < 3 * unit + 0.5
    assert not alice._mailbox._requests  # the pending entry is gone
    await alice.flush(timeout=1)  # and the connection carries on


async def test_who_lists_the_members_of_a_room(start_server, open_client) -> None:
    server = await start_server()
    alice, bob, carol = [await open_client(server.port, n) for n in ("alice", "bob", "carol")]
    await alice.join("chat")
    await bob.join("chat")
    assert await carol.who("chat", timeout=1) == ["alice", "bob"]
    assert await carol.who("empty", timeout=1) == []


async def test_presence_iterator_yields_joins_and_leaves(start_server, open_client) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    bob = await open_client(server.port, "bob")
    events = alice.presence()
    await alice.join("chat")
    await bob.join("chat")
    await bob.leave("chat")
    async with asyncio.timeout(1):
        seen = [await anext(events), await anext(events)]
    assert seen == [
        Presence(room="chat", name="bob", event="join"),
        Presence(room="chat", name="bob", event="leave"),
    ]
    with pytest.raises(TimeoutError):
        await alice.receive(timeout=0.05)  # presence never mixes into messages


async def test_leaving_a_room_not_joined_is_rejected(start_server, open_client) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    with pytest.raises(RejectedError) as caught:
        await alice.leave("never.joined", timeout=1)
    assert caught.value.code == "not_member"


async def test_publish_returns_before_the_ack_unless_confirm(start_server, open_client) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    await alice.publish("chat", 1)
    assert alice.unacknowledged == 1  # in the outbox, not yet acknowledged
    await alice.publish("chat", 2, confirm=True, timeout=1)
    assert alice.unacknowledged == 0


async def test_a_refused_confirmed_publish_names_its_id_and_the_reason(
    start_server, open_client
) -> None:
    server = await start_server(max_msgs_per_sec=1)
    alice = await open_client(server.port, "alice")
    refusals: list[RejectedError] = []
    for n in range(10):
        try:
            await alice.publish("numbers", n, confirm=True, timeout=1)
        except RejectedError as exc:
            refusals.append(exc)
    assert refusals, "the rate limit refused some"
    for error in refusals:
        assert error.code == "rate_limited" and error.message
        assert len(error.ids) == 1 and 1 <= int(error.ids[0]) <= 10
    assert len({error.ids for error in refusals}) == len(refusals)


async def test_flush_waits_until_a_pipelined_stream_is_acknowledged(
    start_server, open_client
) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    bob = await open_client(server.port, "bob")
    await bob.join("numbers")
    for n in range(2000):
        await alice.publish("numbers", n)
    assert alice.unacknowledged > 0
    await alice.flush(timeout=5)
    assert alice.unacknowledged == 0
    assert await bodies(bob, 2000) == list(range(2000))


async def test_flush_raises_when_the_server_refused_messages_it_waited_for(
    start_server, open_client
) -> None:
    server = await start_server(max_msgs_per_sec=5)
    alice = await open_client(server.port, "alice")
    bob = await open_client(server.port, "bob")
    await bob.join("numbers")
    for n in range(40):
        await alice.publish("numbers", n)
    with pytest.raises(RejectedError, match=r"of 40 messages were refused") as caught:
        await alice.flush(timeout=5)
    assert caught.value.code == "rate_limited"
    refused = int(str(caught.value).split()[0])
    assert 30 <= refused < 40
    ids = [int(each) for each in caught.value.ids]  # which ones: publish ids count from 1
    assert len(ids) == refused and ids == sorted(ids) and set(ids) <= set(range(1, 41))
    assert alice.unacknowledged == 0  # refused messages leave the outbox: a resend would fail
    got = [(await bob.receive(1)).body for _ in range(40 - refused)]
    assert got == sorted(got)
    await alice.flush(timeout=1)  # refused before this flush was asked: not its business
    for n in range(40):
        await alice.publish("numbers", n)
    await alice.close(timeout=5)  # close flushes too, but refusals (logged) do not stop it
    assert alice.state is ClientState.CLOSED and alice.unacknowledged == 0


# -- disconnects, reconnects and resume ------------------------------------------------------


async def test_outbox_waits_while_disconnected_and_drains_after(
    start_server, open_client, unit
) -> None:
    server = await start_server()
    bob = await open_client(server.port, "bob")
    await bob.join("chat")
    async with FaultProxy(server.port) as proxy:
        alice = await open_client(proxy.port, "alice", max_outbox=50)
        changes = alice.state_changes()
        proxy.refuse()
        proxy.cut()
        await next_event(changes, Disconnected, 1)
        for n in range(50):
            await alice.publish("chat", n)  # returns at once: the outbox keeps it
        assert alice.unacknowledged == 50
        with pytest.raises(TimeoutError, match="publish"):
            await alice.publish("chat", 50, timeout=unit)  # full: waits, then gives up
        with pytest.raises(TimeoutError, match="flush"):
            await alice.flush(timeout=unit)
        proxy.refuse(False)
        await alice.flush(timeout=5)
        assert alice.unacknowledged == 0
        assert await bodies(bob, 50) == list(range(50))


async def test_client_resumes_its_session_and_gets_what_it_missed(
    start_server, open_client
) -> None:
    server = await start_server()
    alice = await open_client(server.port, "alice")
    async with FaultProxy(server.port) as proxy:
        bob = await open_client(proxy.port, "bob")
        await bob.join("chat")
        await alice.publish("chat", "before", confirm=True)
        assert (await bob.receive(1)).body == "before"
        session = bob.session
        changes = bob.state_changes()
        proxy.refuse()
        proxy.cut()
        assert (await next_event(changes, Disconnected, 1)).reason
        for n in range(10):
            await alice.publish("chat", n)
        await alice.flush(timeout=1)
        proxy.refuse(False)
        assert await next_event(changes, Reconnected, 3) == Reconnected(resumed=True, gap=0)
        assert bob.session == session
        received = [await bob.receive(1) for _ in range(10)]
        assert [m.body for m in received] == list(range(10))
        assert [m.seq for m in received] == list(range(2, 12))
        with pytest.raises(TimeoutError):
            await bob.receive(timeout=0.1)  # nothing twice


async def test_client_survives_a_server_restart_on_the_same_port(start_server, open_client) -> None:
    server = await start_server()
    port = server.port
    alice = await open_client(port, "alice")
    bob = await open_client(port, "bob")
    await bob.join("chat")
    bob_changes, alice_changes = bob.state_changes(), alice.state_changes()
    await server.close()
    assert await next_event(bob_changes, Disconnected, 2) == Disconnected("server_shutdown")
    await start_server(port=port)
    # A new server does not know the session: a fresh one, the rooms joined again, gap unknown.
    assert await next_event(bob_changes, Reconnected, 3) == Reconnected(resumed=False, gap=None)
    await next_event(alice_changes, Reconnected, 3)
    await bob.flush(timeout=1)  # the rejoin is acknowledged
    await alice.publish("chat", "after the restart", confirm=True, timeout=1)
    message = await bob.receive(timeout=1)
    assert (message.body, message.seq) == ("after the restart", 1)


async def test_state_changes_tell_the_whole_story(start_server, open_client, unit) -> None:
    server = await start_server()
    async with FaultProxy(server.port) as proxy:
        alice = await open_client(proxy.port, "alice")
        changes, waiting = alice.state_changes(), alice.state_changes()
        proxy.refuse()
        proxy.cut()
        await asyncio.sleep(4 * unit)
        assert alice.state is ClientState.RECONNECTING
        proxy.refuse(False)
        await next_event(waiting, Reconnected, 3)
        assert alice.state is ClientState.CONNECTED
        await alice.close(timeout=1)
        assert alice.state is ClientState.CLOSED
        seen = [change async for change in changes]
    assert isinstance(seen[0], Disconnected)
    attempts = [c for c in seen if isinstance(c, Reconnecting)]
    assert [a.attempt for a in attempts] == list(range(1, len(attempts) + 1))
    assert len(attempts) >= 2
    assert seen[1 + len(attempts) :] == [Reconnected(resumed=True, gap=0), Closed()]


async def test_reconnect_waits_grow_with_jitter_under_the_cap_and_are_logged(
    start_server, open_client, unit
) -> None:
    server = await start_server()
    base, cap = unit / 4, unit
    async with FaultProxy(server.port) as proxy:
        with capture_logs() as logs:
            alice = await open_client(proxy.port, "alice", reconnect_base=base, reconnect_cap=cap)
            changes = alice.state_changes()
            proxy.refuse()
            proxy.cut()
            await asyncio.sleep(8 * unit)
            proxy.refuse(False)
            await next_event(changes, Reconnected, 3)
    scheduled = [e for e in logs if e["event"] == "reconnect_scheduled"]
    assert len(scheduled) >= 4
    for number, event in enumerate(scheduled, start=1):
        assert event["attempt"] == number
        assert 0 <= event["delay"] <= min(cap, base * 2 ** (number - 1)) + 1e-3
    delays = [e["delay"] for e in scheduled]
    assert max(delays[2:]) > base  # the bound grows past the base...
    assert len(set(delays)) > len(delays) // 2  # ...and each wait is drawn at random
    failed = [e for e in logs if e["event"] == "reconnect_failed"]
    assert failed and all(e["log_level"] == "warning" for e in failed)
    assert any(e["event"] == "connection_lost" for e in logs)


async def test_the_attempt_count_restarts_once_a_connection_stayed_up(
    start_server, open_client, unit
) -> None:
    server = await start_server()
    base = unit / 10  # a connection is stable after 10 x base = one unit

    async def outage(changes: AsyncIterator[StateChange], refused: float) -> list[int]:
        proxy.refuse()
        proxy.cut()
        await asyncio.sleep(refused)
        proxy.refuse(False)
        attempts = []
        async with asyncio.timeout(3):
            async for change in changes:
                if isinstance(change, Reconnecting):
                    attempts.append(change.attempt)
                elif isinstance(change, Reconnected):
                    return attempts
        raise AssertionError("the state changes ended")

    async with FaultProxy(server.port) as proxy:
        alice = await open_client(proxy.port, "alice", reconnect_base=base, reconnect_cap=base)
        changes = alice.state_changes()
        first = await outage(changes, 3 * unit)
        second = await outage(changes, 0)  # right after reconnecting: the count goes on
        await asyncio.sleep(2 * unit)
        third = await outage(changes, 0)  # after a stable connection: it starts again
    assert first[0] == 1 and len(first) >= 2
    assert second[0] == first[-1] + 1
    assert third[0] == 1


async def test_out_of_attempts_the_client_closes_and_waiters_get_closed_error(
    start_server, open_client
) -> None:
    server = await start_server()
    async with FaultProxy(server.port) as proxy:
        alice = await open_client(proxy.port, "alice", max_attempts=2)
        changes = alice.state_changes()
        proxy.refuse()
        proxy.cut()
        await next_event(changes, Disconnected, 1)
        with pytest.raises(ClosedError, match="2 reconnect attempts"):
            await alice.publish("chat", 1, confirm=True, timeout=5)
        assert alice.state is ClientState.CLOSED
        closed = await next_event(changes, Closed, 1)
        assert closed.error is not None
        with pytest.raises(ClosedError):
            async for _ in alice:
                pass


async def test_close_during_a_reconnect_backoff_returns_at_once(start_server, open_client) -> None:
    server = await start_server()
    async with FaultProxy(server.port) as proxy:
        alice = await open_client(proxy.port, "alice", reconnect_base=20.0, reconnect_cap=20.0)
        changes = alice.state_changes()
        proxy.refuse()
        proxy.cut()
        await next_event(changes, Reconnecting, 1)
        await alice.publish("chat", "never sent")
        started = time.monotonic()
        await alice.close(timeout=10)
        assert time.monotonic() - started < 0.5
        assert alice.state is ClientState.CLOSED


@pytest.mark.parametrize("advertised", [True, False], ids=["from_welcome", "overridden"])
async def test_heartbeat_finds_a_black_holed_server_and_reconnects(
    start_server, open_client, unit, advertised: bool
) -> None:
    beat = {"heartbeat_interval": unit, "heartbeat_timeout": 3 * unit}
    server = await start_server(**(beat if advertised else {}))
    async with FaultProxy(server.port) as proxy:
        with capture_logs() as logs:
            alice = await open_client(proxy.port, "alice", **({} if advertised else beat))
            changes = alice.state_changes()
            await asyncio.sleep(2 * unit)
            if not advertised:  # our interval is shorter than the server's: we ping, it answers
                assert alice.rtt is not None and 0 <= alice.rtt < 1
            proxy.blackhole()
            started = time.monotonic()
            assert await next_event(changes, Disconnected, 2) == Disconnected("heartbeat_timeout")
            assert time.monotonic() - started <= 4 * unit + 0.3  # timeout + one interval
            proxy.blackhole(False)
            await next_event(changes, Reconnected, 3)
    assert any(e["event"] == "heartbeat_timeout" for e in logs)


async def test_an_unauthorized_reconnect_is_logged_and_retried(
    start_server, open_client, unit
) -> None:
    server = await start_server(token="tok-3f9a")
    port = server.port
    alice = await open_client(port, "alice", token="tok-3f9a")
    changes = alice.state_changes()
    with capture_logs() as logs:
        await server.close()
        server = await start_server(port=port, token="tok-rotated")
        await asyncio.sleep(4 * unit)
        assert alice.state is ClientState.RECONNECTING
        await server.close()
        await start_server(port=port, token="tok-3f9a")
        assert await next_event(changes, Reconnected, 3) == Reconnected(resumed=False, gap=None)
    failures = [e["error"] for e in logs if e["event"] == "reconnect_failed"]
    assert any("token is missing or wrong" in error for error in failures)
    assert not any("tok-3f9a" in str(e) for e in logs)  # tokens are never logged


async def test_close_never_hangs_on_a_black_holed_server(start_server, open_client, unit) -> None:
    server = await start_server()
    async with FaultProxy(server.port) as proxy:
        alice = await open_client(proxy.port, "alice")
        proxy.blackhole()
        for n in range(10):
            await alice.publish("chat", n)
        started = time.monotonic()
        await alice.close(timeout=3 * unit)
        assert time.monotonic() - started < 3 * unit + 0.3
        assert alice.state is ClientState.CLOSED


async def test_retry_true_waits_for_the_server_to_appear(start_server, tls_files, unit) -> None:
    server = await start_server()
    async with FaultProxy(server.port) as proxy:
        proxy.refuse()
        connecting = asyncio.create_task(
            connect(
                "localhost", proxy.port, ca=str(tls_files.ca_pem), name="alice", retry=True,
                reconnect_base=unit / 2, reconnect_cap=unit,
            ).open()
        )  # fmt: skip
        await asyncio.sleep(3 * unit)
        assert not connecting.done()
        proxy.refuse(False)
        async with asyncio.timeout(2):
            alice = await connecting
        assert alice.state is ClientState.CONNECTED
        await alice.close(timeout=1)


# -- failing to connect: one sentence, the right type ------------------------------------------


async def test_wrong_ca_is_a_tls_error_unknown_authority(start_server, tls_files) -> None:
    server = await start_server()
    with pytest.raises(TLSError) as caught:
        await connect("localhost", server.port, ca=str(tls_files.other_ca_pem), name="alice")
    assert caught.value.check == "unknown_authority"
    assert "localhost" in str(caught.value) and "--ca" in str(caught.value)


async def test_wrong_ca_is_not_retried_even_with_retry_true(start_server, tls_files) -> None:
    server = await start_server()
    started = time.monotonic()
    with pytest.raises(TLSError):
        await connect(
            "localhost", server.port, ca=str(tls_files.other_ca_pem), name="alice", retry=True
        )
    assert time.monotonic() - started < 1


async def test_wrong_host_name_is_a_tls_error_hostname_mismatch(
    start_server, tls_files, tmp_path: Path
) -> None:
    leaf = tls_files.ca.issue_cert("elsewhere.test")
    cert, key = tmp_path / "elsewhere.pem", tmp_path / "elsewhere.key"
    leaf.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    server = await start_server(cert=str(cert), key=str(key))
    with pytest.raises(TLSError) as caught:
        await connect("localhost", server.port, ca=str(tls_files.ca_pem), name="alice")
    assert caught.value.check == "hostname_mismatch"


async def test_nothing_listening_is_a_connect_error_naming_host_and_port(tls_files) -> None:
    port = free_port()
    with pytest.raises(ConnectError) as caught:
        await connect("localhost", port, ca=str(tls_files.ca_pem), name="alice")
    assert type(caught.value) is ConnectError
    assert f"localhost:{port}" in str(caught.value) and "refused" in str(caught.value)


async def test_a_taken_name_is_an_auth_error(start_server, open_client, tls_files) -> None:
    server = await start_server()
    await open_client(server.port, "alice")
    with pytest.raises(AuthError) as caught:
        await connect("localhost", server.port, ca=str(tls_files.ca_pem), name="alice")
    assert caught.value.code == "name_taken"
    assert f"localhost:{server.port}" in str(caught.value)


async def test_a_wrong_token_is_an_auth_error(start_server, open_client, tls_files) -> None:
    server = await start_server(token="s3cret")
    with pytest.raises(AuthError) as caught:
        await connect("localhost", server.port, ca=str(tls_files.ca_pem), name="a", token="no")
    assert caught.value.code == "unauthorized"
    alice = await open_client(server.port, "alice", token="s3cret")
    assert alice.state is ClientState.CONNECTED


async def test_mutual_tls_names_the_client_and_refuses_a_foreign_certificate(
    start_server, open_client, tls_files
) -> None:
    server = await start_server(ca=str(tls_files.ca_pem), require_client_cert=True)
    alice = await open_client(
        server.port, None, cert=str(tls_files.alice_cert), key=str(tls_files.alice_key)
    )
    assert alice.name == "alice"
    with pytest.raises(TLSError) as caught:
        await connect(
            "localhost", server.port, ca=str(tls_files.ca_pem),
            cert=str(tls_files.intruder_cert), key=str(tls_files.intruder_key),
        )  # fmt: skip
    assert caught.value.check == "client_certificate"


async def test_the_client_runs_on_uvloop_too(start_server, tls_files, unit) -> None:
    uvloop = pytest.importorskip("uvloop")
    server = await start_server()
    options = {"ca": str(tls_files.ca_pem), "heartbeat_interval": unit}

    async def scenario() -> tuple[Any, float | None, str]:
        async with (
            connect("localhost", server.port, name="alice", **options) as alice,
            connect("localhost", server.port, name="bob", **options) as bob,
        ):
            await bob.join("chat")
            await alice.publish("chat", {"on": "uvloop"}, confirm=True, timeout=1)
            received = await bob.receive(timeout=1)
            await asyncio.sleep(2 * unit)
            return received.body, alice.rtt, type(asyncio.get_running_loop()).__module__

    body, rtt, loop_module = await asyncio.to_thread(uvloop.run, scenario())
    assert body == {"on": "uvloop"} and rtt is not None
    assert loop_module.startswith("uvloop")


async def test_messages_larger_than_the_read_buffer_and_many_at_once_arrive_intact(
    start_server, open_client
) -> None:
    # TLS decrypts into one shared buffer per thread (securemsg.core.readbuffer): a message larger
    # than it takes several reads, and a burst fills it many times over.
    from securemsg.core.readbuffer import READ_BUFFER_SIZE

    server = await start_server()
    alice = await open_client(server.port, "alice")
    bob = await open_client(server.port, "bob")
    carol = await open_client(server.port, "carol")
    await bob.join("big")
    await carol.join("big")
    large = "".join(chr(ord("a") + i % 26) for i in range(READ_BUFFER_SIZE + 100_000))
    small = [f"{i:06d}" + "x" * 200 for i in range(2_000)]
    await alice.publish("big", large)
    for body in small:
        await alice.publish("big", body)
    await alice.publish("big", large[::-1], confirm=True)
    for reader in (bob, carol):
        assert (await reader.receive(timeout=5)).body == large
        for body in small:
            assert (await reader.receive(timeout=5)).body == body
        assert (await reader.receive(timeout=5)).body == large[::-1]
