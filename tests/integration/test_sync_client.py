"""The blocking client, used from plain threads against a server on this test's event loop.

The server runs on the test's loop, so every blocking call happens in another thread
(``asyncio.to_thread``), exactly as a program that is not asyncio would use it.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from typing import Any

import pytest

from securemsg import ClosedError, sync
from securemsg.client.types import ClientState, Message
from securemsg.errors import ConnectError, RejectedError, TimeoutError
from tests.faults import FaultProxy

pytestmark = pytest.mark.timeout(30)


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "securemsg-client"]


@pytest.fixture
def options(tls_files: Any, unit: float) -> dict[str, Any]:
    return {"ca": str(tls_files.ca_pem), "reconnect_base": unit / 2, "reconnect_cap": 2 * unit}


async def test_blocking_client_in_a_plain_thread(start_server, options) -> None:
    server = await start_server()

    def program() -> tuple[Message, Message, list[str]]:
        with sync.connect("localhost", server.port, name="alice", **options) as alice:
            with sync.connect("localhost", server.port, name="bob", **options) as bob:
                bob.join("chat")
                alice.publish("chat", {"n": 1}, confirm=True)
                alice.direct("bob", "psst")
                alice.flush(timeout=1)
                members = alice.who("chat", timeout=1)
                return bob.receive(timeout=1), bob.receive(timeout=1), members

    room_message, direct, members = await asyncio.to_thread(program)
    assert (room_message.room, room_message.sender, room_message.body) == (
        "chat",
        "alice",
        {"n": 1},
    )
    assert (direct.to, direct.body) == ("bob", "psst")
    assert members == ["bob"]
    assert not client_threads()  # every loop thread stopped on close


async def test_blocking_flush_raises_when_the_server_refused_messages(
    start_server, options
) -> None:
    server = await start_server(max_msgs_per_sec=5)

    def program() -> tuple[str, str, int, tuple[str, ...]]:
        with sync.connect("localhost", server.port, name="alice", **options) as alice:
            for n in range(40):
                alice.publish("numbers", n)
            try:
                alice.flush(timeout=5)
            except RejectedError as exc:
                return exc.code, str(exc), alice.client.unacknowledged, exc.ids
            return "", "flush returned normally", alice.client.unacknowledged, ()

    code, text, left, ids = await asyncio.to_thread(program)
    assert code == "rate_limited", text
    assert "of 40 messages were refused" in text
    assert left == 0
    assert int(text.split()[0]) == len(ids) and set(ids) <= {str(n) for n in range(1, 41)}


async def test_one_blocking_client_shared_by_two_threads(start_server, options) -> None:
    server = await start_server()
    count = 200

    def program() -> list[Any]:
        with (
            sync.connect("localhost", server.port, name="alice", **options) as alice,
            sync.connect("localhost", server.port, name="bob", **options) as bob,
        ):
            bob.join("chat")

            def send(tag: str) -> None:
                for n in range(count):
                    alice.publish("chat", [tag, n])

            threads = [threading.Thread(target=send, args=(tag,)) for tag in "ab"]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            alice.flush(timeout=5)
            return [bob.receive(timeout=2).body for _ in range(2 * count)]

    received = await asyncio.to_thread(program)
    for tag in "ab":  # each thread's messages all arrive, in that thread's order
        assert [n for t, n in received if t == tag] == list(range(count))


async def test_iteration_ends_when_another_thread_closes_the_client(
    start_server, options, unit
) -> None:
    server = await start_server()

    def program() -> list[Any]:
        alice = sync.connect("localhost", server.port, name="alice", **options)
        bob = sync.connect("localhost", server.port, name="bob", **options)
        bob.join("chat")
        for n in range(3):
            alice.publish("chat", n)
        alice.close()
        timer = threading.Timer(3 * unit, bob.close)
        timer.start()
        try:
            return [message.body for message in bob]
        finally:
            timer.join()

    assert await asyncio.to_thread(program) == [0, 1, 2]


async def test_request_and_reply_across_threads(start_server, options, unit) -> None:
    server = await start_server()

    def program() -> tuple[Any, float]:
        with (
            sync.connect("localhost", server.port, name="client", **options) as client,
            sync.connect("localhost", server.port, name="service", **options) as service,
        ):
            service.join("echo")

            def serve() -> None:
                request = service.receive(timeout=2)
                service.reply(request, ["echo", request.body])

            server_thread = threading.Thread(target=serve)
            server_thread.start()
            answer = client.request("echo", "hi", timeout=2)
            server_thread.join(5)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                client.request("nobody", "hi", timeout=2 * unit)
            return answer.body, time.monotonic() - started

    body, waited = await asyncio.to_thread(program)
    assert body == ["echo", "hi"]
    assert waited < 2 * unit + 0.5


async def test_connect_failure_raises_in_the_calling_thread(options) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectError, match=f"localhost:{port}"):
        await asyncio.to_thread(sync.connect, "localhost", port, name="alice", **options)
    assert not client_threads()


async def test_close_never_hangs_on_a_black_holed_server(start_server, options, unit) -> None:
    server = await start_server()
    async with FaultProxy(server.port) as proxy:

        def program() -> float:
            alice = sync.connect("localhost", proxy.port, name="alice", **options)
            proxy.blackhole()
            for n in range(5):
                alice.publish("chat", n)
            with pytest.raises(TimeoutError):
                alice.flush(timeout=unit)
            started = time.monotonic()
            alice.close(timeout=2 * unit)
            alice.close(timeout=2 * unit)  # twice is fine
            assert alice.state is ClientState.CLOSED
            return time.monotonic() - started

        assert await asyncio.to_thread(program) < 2 * unit + 1.5
    assert not client_threads()


async def test_interpreter_exit_never_hangs_on_an_open_client(
    start_server, tls_files, unit
) -> None:
    server = await start_server()
    async with FaultProxy(server.port) as proxy:
        script = (
            "import securemsg.client.sync as s, securemsg.log as l\n"
            "l.configure_logging(level='warning')\n"
            f"c = s.connect('localhost', {proxy.port}, ca={str(tls_files.ca_pem)!r}, name='x')\n"
            "c.publish('chat', 1)\n"
            "print('connected', flush=True)\n"
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"connected\n"
        proxy.blackhole()  # nothing the exit could wait for will ever be answered
        started = time.monotonic()
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert time.monotonic() - started < 4


async def test_publish_without_confirm_hands_over_in_order_and_raises_bad_input_at_once(
    start_server, options
) -> None:
    # bob takes nothing until alice's flushes return, and what he has not taken counts
    # toward his session's window: half of it would hold alice back (flow control).
    server = await start_server(max_frame=4096, max_pending=20_000)

    def program() -> tuple[list[Any], list[str]]:
        raised: list[str] = []
        with sync.connect("localhost", server.port, name="alice", **options) as alice:
            with sync.connect("localhost", server.port, name="bob", **options) as bob:
                bob.join("chat")
                for i in range(5_000):  # more than can be handed over at once: it waits
                    alice.publish("chat", i)
                for bad_room, body in (("no spaces", 1), ("chat", object())):
                    try:
                        alice.publish(bad_room, body)
                    except (ValueError, TypeError) as exc:  # in this thread, at once
                        raised.append(type(exc).__name__)
                alice.publish("chat", "x" * 5_000)  # over max_frame: found in the loop thread
                try:
                    alice.flush(timeout=5)
                except ValueError as exc:
                    raised.append(f"flush: {exc}")
                alice.publish("chat", "after")  # the failure was raised once, not forever
                alice.flush(timeout=5)
                received = [bob.receive(timeout=5).body for _ in range(5_001)]
        try:
            alice.publish("chat", "closed")
        except ClosedError:
            raised.append("closed")
        return received, raised

    received, raised = await asyncio.to_thread(program)
    assert received == [*range(5_000), "after"]
    assert raised[:2] == ["ValueError", "TypeError"]
    assert raised[2].startswith("flush: message of") and "max_frame" in raised[2]
    assert raised[3:] == ["closed"]


async def test_calls_that_send_keep_their_place_after_handed_over_publishes(
    start_server, options
) -> None:
    server = await start_server()

    def program() -> list[Any]:
        # A tiny outbox, so that hand-overs wait for room while the later calls arrive.
        with sync.connect("localhost", server.port, name="alice", max_outbox=4, **options) as a:
            with sync.connect("localhost", server.port, name="bob", **options) as bob:
                bob.join("chat")
                for i in range(200):
                    a.publish("chat", i)
                a.publish("chat", "confirmed", confirm=True, timeout=5)
                a.direct("bob", "direct", timeout=5)
                return [bob.receive(timeout=5).body for _ in range(202)]

    assert await asyncio.to_thread(program) == [*range(200), "confirmed", "direct"]


async def test_close_raises_a_handed_over_publish_that_failed_and_nobody_was_told(
    start_server, options
) -> None:
    server = await start_server()

    def program() -> str:
        try:
            with sync.connect("localhost", server.port, name="alice", **options) as alice:
                alice.publish("chat", "x" * (2 * 1024 * 1024))  # over max_frame, found later
        except ValueError as exc:
            return str(exc)
        return "the with block ended as if it had been sent"

    text = await asyncio.to_thread(program)
    assert "max_frame" in text, text


async def test_an_error_in_the_with_block_stays_the_error_and_carries_the_close_failure(
    start_server, options
) -> None:
    server = await start_server()

    def program() -> BaseException:
        try:
            with sync.connect("localhost", server.port, name="alice", **options) as alice:
                alice.publish("chat", "x" * (2 * 1024 * 1024))
                raise KeyError("the application's own")
        except BaseException as exc:
            return exc
        raise AssertionError("nothing raised")

    error = await asyncio.to_thread(program)
    assert type(error) is KeyError
    assert any("max_frame" in note for note in getattr(error, "__notes__", []))
