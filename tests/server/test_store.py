"""The session store: what it keeps, group commit off the loop, crash safety, bad files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from securemsg.config import ServerConfig, load_config
from securemsg.errors import ConfigError, StoreError
from securemsg.server.store import MemoryStore, SqliteStore, StoredSession
from securemsg.server.storefile import APPLICATION_ID, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[2]


def count(path: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def reopened(path: Path) -> dict[str, StoredSession]:
    store = SqliteStore(str(path))
    sessions = await store.open()
    await store.close()
    return {session.id: session for session in sessions}


# -- the memory store ------------------------------------------------------------------------


async def test_the_memory_store_keeps_nothing_and_calls_back_at_once() -> None:
    store = MemoryStore()
    assert await store.open() == []
    store.session_created("s1", name="a", token="t")
    store.message_accepted(b"{", [("s1", 1)])
    called: list[int] = []
    store.after_commit(called.append, 1)
    assert called == [1]
    await store.wait_committed()
    await store.close()
    assert await store.open() == []


# -- round trips -----------------------------------------------------------------------------


async def test_a_reopened_store_has_what_was_written_minus_what_was_acked_or_ended(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path), dedup_window=3)
    assert await store.open() == []
    store.session_created("s1", name="alice", token="tok-a")
    store.session_created("s2", name="bob", token="tok-b")
    store.session_created("s3", name="carol", token="tok-c")
    store.joined("s1", "lobby")
    store.joined("s1", "sensors.>")
    store.joined("s2", "lobby")
    store.left("s1", "sensors.>")
    store.message_accepted(b'{"a"', [("s1", 1), ("s2", 1)])
    store.message_accepted(b'{"b"', [("s1", 2)])
    await store.wait_committed()  # a second transaction from here on
    store.message_accepted(b'{"c"', [("s1", 3), ("s2", 2), ("s3", 1)])
    store.acked("s1", 2)
    for msg_id in ("1", "2", "3", "4", "5", "6", "7"):
        store.id_recorded("s2", msg_id)
    store.session_detached("s2", expires_at=1234.5)
    store.session_detached("s1", expires_at=99.0)
    store.session_attached("s1")
    store.session_ended("s3")
    await store.close()

    sessions = await reopened(path)
    assert sorted(sessions) == ["s1", "s2"]
    alice, bob = sessions["s1"], sessions["s2"]
    assert (alice.name, alice.token, alice.expires_at) == ("alice", "tok-a", None)
    assert alice.filters == ("lobby",)
    assert (alice.acked, alice.last_seq, alice.pending) == (2, 3, ((3, b'{"c"'),))
    assert (bob.name, bob.token, bob.expires_at) == ("bob", "tok-b", 1234.5)
    assert bob.pending == ((1, b'{"a"'), (2, b'{"c"'))
    assert (bob.acked, bob.last_seq) == (0, 2)
    # Pruned at the sixth id to the last 3: at least 3, at most 6 are kept, in order.
    assert bob.recent_ids == ("4", "5", "6", "7")
    assert "tok-a" not in repr(alice)


async def test_a_reopened_store_goes_on_numbering_messages_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path), dedup_window=2)
    await store.open()
    store.session_created("s1", name="a", token="t")
    store.message_accepted(b"x", [("s1", 1)])
    store.id_recorded("s1", "1")
    await store.close()
    store = SqliteStore(str(path), dedup_window=2)
    await store.open()
    store.message_accepted(b"y", [("s1", 2)])  # message numbers do not collide
    for msg_id in ("2", "3", "4"):  # numbered 2 to 4: pruned to the last 2 at the fourth
        store.id_recorded("s1", msg_id)
    await store.close()
    session = (await reopened(path))["s1"]
    assert session.pending == ((1, b"x"), (2, b"y"))
    assert session.recent_ids == ("3", "4")


async def test_a_session_made_under_a_used_id_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    store.session_created("s1", name="old", token="t1")
    store.joined("s1", "lobby")
    store.message_accepted(b"x", [("s1", 1)])
    store.id_recorded("s1", "a")
    await store.close()
    store = SqliteStore(str(path))
    await store.open()
    store.session_created("s1", name="new", token="t2")  # a broker that numbers from 1 again
    store.id_recorded("s1", "b")
    await store.close()
    session = (await reopened(path))["s1"]
    assert (session.name, session.filters, session.pending) == ("new", (), ())
    assert (session.recent_ids, session.last_seq) == (("b",), 0)
    assert count(path, "message") == 0


async def test_a_message_for_three_recipients_is_stored_once(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    for sid in ("s1", "s2", "s3"):
        store.session_created(sid, name=sid, token=sid)
    store.message_accepted(b"x" * 1000, [("s1", 1), ("s2", 1), ("s3", 1)])
    await store.close()
    assert count(path, "message") == 1
    assert count(path, "pending") == 3
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT sum(length(prefix)) FROM message").fetchone()[0] == 1000


async def test_acks_drop_references_and_the_last_one_deletes_the_message(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    for sid in ("s1", "s2", "s3"):
        store.session_created(sid, name=sid, token=sid)
    store.message_accepted(b"shared", [("s1", 1), ("s2", 1), ("s3", 1)])
    store.message_accepted(b"second", [("s1", 2)])
    await store.wait_committed()
    store.acked("s1", 2)
    store.acked("s2", 1)
    await store.wait_committed()
    await store.close()
    assert (count(path, "message"), count(path, "pending")) == (1, 1)

    store = SqliteStore(str(path))
    await store.open()
    store.session_ended("s3")  # an end drops references as an ack does
    await store.close()
    assert (count(path, "message"), count(path, "pending")) == (0, 0)


async def test_a_message_for_one_recipient_is_kept_in_its_pending_row_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    store.session_created("s1", name="s1", token="t1")
    store.message_accepted(b"solo", [("s1", 1)])
    store.message_accepted(b"also", [("s1", 2)])
    await store.close()
    assert (count(path, "message"), count(path, "pending")) == (0, 2)  # no message row

    store = SqliteStore(str(path))
    [kept] = await store.open()
    assert kept.pending == ((1, b"solo"), (2, b"also"))
    store.acked("s1", 1)
    await store.close()
    assert count(path, "pending") == 1


# -- group commit and the loop ---------------------------------------------------------------


async def test_everything_one_loop_iteration_hands_over_is_one_transaction(
    tmp_path: Path,
) -> None:
    statements: list[str] = []
    store = SqliteStore(str(tmp_path / "store.db"), trace=statements.append)
    await store.open()
    statements.clear()
    store.session_created("s1", name="a", token="t")
    store.joined("s1", "lobby")
    for seq in range(1, 201):
        store.message_accepted(b"m%d" % seq, [("s1", seq)])
        store.id_recorded("s1", str(seq))
    store.acked("s1", 100)
    await store.wait_committed()
    assert statements.count("BEGIN") == 1
    store.acked("s1", 200)
    await store.wait_committed()
    assert statements.count("BEGIN") == 2
    await store.close()


async def test_the_loop_runs_on_while_the_writer_is_stuck(tmp_path: Path) -> None:
    release = threading.Event()
    stuck = threading.Event()
    transactions: list[str] = []

    def trace(sql: str) -> None:  # on the writer thread
        if sql == "BEGIN":
            transactions.append(sql)
            if not stuck.is_set():  # only the first: a mutant that blocks the loop ends
                stuck.set()
                release.wait(timeout=10)

    store = SqliteStore(str(tmp_path / "store.db"), trace=trace)
    await store.open()
    store.session_created("s1", name="a", token="t")
    done: list[int] = []
    store.after_commit(done.append, 0)
    assert done == []  # the call returned before any commit
    await asyncio.to_thread(stuck.wait, 10)
    # The writer is inside the first transaction: the loop goes on accepting, for many
    # iterations, more than the bounded queue could hold as separate batches.
    for seq in range(1, 51):
        store.message_accepted(b"m", [("s1", seq)])
        store.after_commit(done.append, seq)
        await asyncio.sleep(0)
    assert done == []
    assert store.backlog > 1
    release.set()
    await store.wait_committed()
    assert done == list(range(51))  # in order, each once its batch was committed
    # The first batch, the one waiting in the queue, then the rest merged into one.
    assert len(transactions) <= 3
    assert store.backlog == 0
    await store.close()


async def test_a_failed_commit_stops_the_store_and_acknowledges_nothing(tmp_path: Path) -> None:
    failures: list[StoreError] = []
    store = SqliteStore(str(tmp_path / "store.db"), on_failure=failures.append)
    await store.open()
    store.session_created("s1", name="a", token="t")
    store.message_accepted(b"m", [("s1", 1)])
    await store.wait_committed()
    store.message_accepted(b"m", [("s1", 1)])  # seq 1 again: a broker bug, refused by SQLite
    called: list[int] = []
    store.after_commit(called.append, 1)
    with pytest.raises(StoreError, match="a commit failed"):
        await store.wait_committed()
    assert called == []
    assert len(failures) == 1
    store.after_commit(called.append, 2)
    assert called == []
    await store.close()


# -- crash safety ----------------------------------------------------------------------------

_WRITER = """
import asyncio, sys
from securemsg.server.store import SqliteStore

async def main() -> None:
    store = SqliteStore(sys.argv[1], sync=sys.argv[2])
    await store.open()
    store.session_created("s1", name="a", token="t")
    seq = 0
    for _ in range(100_000):  # bounded; killed long before
        for _ in range(20):
            seq += 1
            store.message_accepted(b"m%d" % seq, [("s1", seq)])
        store.acked("s1", seq - 30)
        await store.wait_committed()
        print(seq, seq - 30, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("sync", ["normal", "full"])
def test_every_commit_survives_a_kill_9(tmp_path: Path, sync: str, unit: float) -> None:
    path = tmp_path / "store.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), sync], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    committed = acked = 0
    try:
        for _ in range(30):  # 30 commits, then kill it mid-stream
            ready, _, _ = select.select([proc.stdout], [], [], 100 * unit)
            assert ready, "the writer printed nothing"
            committed, acked = map(int, proc.stdout.readline().split())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=100 * unit)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    session = asyncio.run(reopened(path))["s1"]
    assert session.acked >= acked
    assert session.last_seq >= committed
    seqs = [seq for seq, _ in session.pending]
    assert seqs == list(range(session.acked + 1, session.last_seq + 1))
    assert all(prefix == b"m%d" % seq for seq, prefix in session.pending)


# -- bad files -------------------------------------------------------------------------------


async def _written_store(path: Path) -> None:
    store = SqliteStore(str(path))
    await store.open()
    store.session_created("s1", name="a", token="t")
    for seq in range(1, 2001):
        store.message_accepted(b"m" * 200, [("s1", seq)])
    await store.close()


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8192] = b"\xa5" * 8192
    path.write_bytes(bytes(data))


def _future_version(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


def _other_program(path: Path) -> None:
    path.unlink()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.commit()


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (_corrupt, "is corrupt"),
        (lambda p: p.write_bytes(b"just some text\n" * 100), "is not a securemsg store"),
        (_future_version, "was written by a newer securemsg"),
        (_other_program, "SQLite database of another program"),
    ],
    ids=["corrupt", "not-sqlite", "future-version", "other-program"],
)
async def test_a_bad_store_file_is_one_sentence_and_left_untouched(
    tmp_path: Path, spoil: object, expected: str
) -> None:
    path = tmp_path / "store.db"
    await _written_store(path)
    spoil(path)  # type: ignore[operator]
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        await SqliteStore(str(path)).open()
    message = str(caught.value)
    assert message.startswith(f"store {path}: ") and expected in message
    assert "\n" not in message
    assert path.read_bytes() == before


def _entries(directory: Path) -> list[Path]:
    return list(directory.iterdir())


async def test_a_directory_as_the_store_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory, not a store file"):
        await SqliteStore(str(tmp_path)).open()
    assert _entries(tmp_path) == []


async def test_a_store_in_use_by_another_server_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    first = SqliteStore(str(path))
    await first.open()
    with pytest.raises(StoreError, match=r"is in use by another securemsg server$"):
        await SqliteStore(str(path)).open()
    await first.close()
    second = SqliteStore(str(path))
    await second.open()  # free again once the first one closed
    await second.close()


async def test_a_missing_directory_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await SqliteStore(str(tmp_path / "nowhere" / "store.db")).open()


async def test_a_new_store_file_is_private_and_marked_as_ours(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    await store.close()
    assert path.stat().st_mode & 0o777 == 0o600
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- the file stays bounded ------------------------------------------------------------------


def _size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


async def test_the_file_does_not_grow_over_many_write_and_ack_cycles(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path), dedup_window=100)
    await store.open()
    store.session_created("s1", name="a", token="t")
    wal = path.with_name(path.name + "-wal")
    seq, sizes, wal_sizes = 0, [], []
    for cycles in (10, 50):  # 6 MB written in all, 100 KB live at a time
        for _ in range(cycles):
            for _ in range(100):
                seq += 1
                store.message_accepted(b"x" * 1000, [("s1", seq)])
                store.id_recorded("s1", str(seq))
            await store.wait_committed()
            store.acked("s1", seq)
            await store.wait_committed()
            wal_sizes.append(wal.stat().st_size)
        await store.close()
        sizes.append(path.stat().st_size)
        store = SqliteStore(str(path), dedup_window=100)
        await store.open()
    await store.close()
    early, late = sizes
    assert late <= early * 1.25, sizes
    # The WAL is checkpointed back to the start every 1,000 pages (4 MB) or so.
    assert max(wal_sizes) < 6 * 1024 * 1024, wal_sizes


async def test_closing_gives_the_pages_of_acked_messages_back(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    store.session_created("s1", name="a", token="t")
    for seq in range(1, 5001):
        store.message_accepted(b"x" * 1000, [("s1", seq)])
    await store.close()
    peak = path.stat().st_size
    store = SqliteStore(str(path))
    await store.open()
    store.acked("s1", 5000)
    await store.close()
    assert path.stat().st_size < peak / 4
    assert not path.with_name(path.name + "-wal").exists() or _size(path) < peak / 4


# -- configuration ---------------------------------------------------------------------------


def test_store_settings_come_from_the_environment_and_flags(tmp_path: Path) -> None:
    assert ServerConfig().store is None
    assert ServerConfig().store_sync == "normal"
    env = {"SECUREMSG_STORE": str(tmp_path / "s.db"), "SECUREMSG_STORE_SYNC": "full"}
    config = load_config(ServerConfig, env=env)
    assert (config.store, config.store_sync) == (str(tmp_path / "s.db"), "full")
    config = load_config(ServerConfig, env=env, overrides={"store_sync": "normal"})
    assert config.store_sync == "normal"
    with pytest.raises(ConfigError, match="SECUREMSG_STORE_SYNC: expected one of 'normal'"):
        load_config(ServerConfig, env={"SECUREMSG_STORE_SYNC": "off"})
    with pytest.raises(ConfigError, match="store_sync must be one of 'normal', 'full'"):
        ServerConfig(store_sync="off")  # type: ignore[arg-type]
