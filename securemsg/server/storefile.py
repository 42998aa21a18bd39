"""The SQLite file behind :class:`securemsg.server.store.SqliteStore`: schema, checks, load
and the SQL of one batch. Everything here runs on the store's writer thread.

Theory of operation. A message is stored once (``message``: its encoded prefix and how many
recipients still reference it); each recipient gets a ``pending`` row (session, seq,
message). Deleting ``pending`` rows (an ack, a session's end) decrements ``refs`` by
trigger, and a message whose ``refs`` reaches 0 is deleted by a second trigger, so the
reference count lives in one place. ``last_seq`` is not stored: it is the larger of
``acked`` and the highest pending seq. A batch is applied in one transaction, in phases
whose order is safe for any interleaving of the loop's calls within it: sessions are
created first, sessions ended last, and acks and id pruning are cumulative thresholds.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from securemsg.config import StoreSync
from securemsg.errors import StoreError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "Batch",
    "Contents",
    "StoreSync",
    "StoredSession",
    "apply_batch",
    "close_file",
    "load",
    "maintain",
    "open_file",
]

SCHEMA_VERSION: Final = 1
#: "SMSG": marks the file as a securemsg store (``PRAGMA application_id``).
APPLICATION_ID: Final = 0x534D5347
_MAGIC: Final = b"SQLite format 3\x00"
#: The WAL is truncated to this after a checkpoint, so it cannot keep a burst's size.
_WAL_LIMIT: Final = 16 * 1024 * 1024
#: Free pages (of 4 KiB) tolerated before they are given back to the file system.
_FREE_PAGES_KEPT: Final = 1024
#: Seconds to wait for a lock: only another server holds one, and it holds it to the end.
_BUSY_TIMEOUT: Final = 0.2

_SCHEMA: Final = """
CREATE TABLE session (
    sid TEXT PRIMARY KEY, name TEXT NOT NULL, token TEXT NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0, expires_at REAL
) WITHOUT ROWID;
CREATE TABLE membership (
    sid TEXT NOT NULL, filter TEXT NOT NULL, PRIMARY KEY (sid, filter)
) WITHOUT ROWID;
CREATE TABLE recent_id (
    sid TEXT NOT NULL, n INTEGER NOT NULL, msg_id TEXT NOT NULL, PRIMARY KEY (sid, n)
) WITHOUT ROWID;
CREATE TABLE message (id INTEGER PRIMARY KEY, prefix BLOB NOT NULL, refs INTEGER NOT NULL);
CREATE TABLE pending (
    sid TEXT NOT NULL, seq INTEGER NOT NULL, message INTEGER, prefix BLOB,
    PRIMARY KEY (sid, seq)
) WITHOUT ROWID;
CREATE TRIGGER pending_deleted AFTER DELETE ON pending WHEN old.message IS NOT NULL BEGIN
    UPDATE message SET refs = refs - 1 WHERE id = old.message;
END;
CREATE TRIGGER message_unreferenced AFTER UPDATE OF refs ON message WHEN new.refs <= 0 BEGIN
    DELETE FROM message WHERE id = new.id;
END;
"""


@dataclass(frozen=True, slots=True)
class StoredSession:
    """One session as the store has it; ``pending`` is (seq, prefix) in seq order."""

    id: str
    name: str
    token: str = field(repr=False)
    last_seq: int
    acked: int
    #: Wall-clock time (``time.time()``) the detached session expires; None while attached.
    expires_at: float | None
    filters: tuple[str, ...]
    #: Client message ids in the order they were recorded (the dedup window).
    recent_ids: tuple[str, ...]
    pending: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Contents:
    sessions: list[StoredSession]
    next_message: int
    id_counts: dict[str, int]


class Batch:
    """Everything the loop handed over for one transaction, sorted by table."""

    __slots__ = (
        "acks",
        "changes",
        "ends",
        "ids",
        "messages",
        "prunes",
        "refs",
        "sessions",
        "solo",
    )

    def __init__(self) -> None:
        self.sessions: list[tuple[str, str, str]] = []
        #: Rare changes whose order matters (join, leave, attach, detach): (sql, params).
        self.changes: list[tuple[str, tuple[object, ...]]] = []
        self.messages: list[tuple[int, bytes, int]] = []
        self.refs: list[tuple[str, int, int]] = []
        #: Messages for one recipient: kept in the recipient's pending row, no message row
        #: and no reference count (the common case, at half the writes).
        self.solo: list[tuple[str, int, bytes]] = []
        self.ids: list[tuple[str, int, str]] = []
        self.prunes: list[tuple[str, int]] = []
        self.acks: dict[str, int] = {}
        self.ends: list[tuple[str]] = []

    def __len__(self) -> int:
        return (
            len(self.sessions)
            + len(self.changes)
            + len(self.messages)
            + len(self.refs)
            + len(self.solo)
            + len(self.ids)
            + len(self.acks)
            + len(self.ends)
        )


def apply_batch(conn: sqlite3.Connection, batch: Batch) -> None:
    """One transaction; rolled back (and raised) if any statement fails."""
    run = conn.executemany
    conn.execute("BEGIN")
    try:
        if batch.sessions:
            # A new session starts empty, even should its id have been used before.
            sids = [(sid,) for sid, _, _ in batch.sessions]
            for table in ("pending", "membership", "recent_id"):
                run(f"DELETE FROM {table} WHERE sid = ?", sids)
            run("INSERT OR REPLACE INTO session (sid, name, token) VALUES (?,?,?)", batch.sessions)
        for sql, params in batch.changes:
            conn.execute(sql, params)
        if batch.messages:
            run("INSERT INTO message (id, prefix, refs) VALUES (?, ?, ?)", batch.messages)
            run("INSERT INTO pending (sid, seq, message) VALUES (?, ?, ?)", batch.refs)
        if batch.solo:
            run("INSERT INTO pending (sid, seq, prefix) VALUES (?, ?, ?)", batch.solo)
        if batch.ids:
            run("INSERT OR REPLACE INTO recent_id (sid, n, msg_id) VALUES (?, ?, ?)", batch.ids)
        if batch.prunes:
            run("DELETE FROM recent_id WHERE sid = ? AND n <= ?", batch.prunes)
        if batch.acks:
            acks = [(seq, sid) for sid, seq in batch.acks.items()]
            run("UPDATE session SET acked = max(acked, ?) WHERE sid = ?", acks)
            run("DELETE FROM pending WHERE seq <= ? AND sid = ?", acks)
        if batch.ends:
            for table in ("pending", "membership", "recent_id", "session"):
                run(f"DELETE FROM {table} WHERE sid = ?", batch.ends)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


# SQL of the ordered changes (Batch.changes).
JOIN: Final = "INSERT OR IGNORE INTO membership (sid, filter) VALUES (?, ?)"
LEAVE: Final = "DELETE FROM membership WHERE sid = ? AND filter = ?"
DETACH: Final = "UPDATE session SET expires_at = ? WHERE sid = ?"


# -- opening ---------------------------------------------------------------------------------


def open_file(
    path: str, *, sync: StoreSync, trace: Callable[[str], None] | None = None
) -> sqlite3.Connection:
    """Check the file (read-only), then open it for writing; StoreError with one sentence,
    the file untouched, if it is not a securemsg store this version can use."""
    where = f"store {path}"
    target = Path(path)
    if target.is_dir():
        raise StoreError(f"{where}: is a directory, not a store file; give a file path")
    if target.exists():
        _check_header(target, where)
        _check_contents(path, where)
    else:
        _create_empty(target, where)
    try:
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{where}: cannot open it ({exc})") from exc
    try:
        # Held from the first write to the close (and freed by the OS if we die): a second
        # server on the same file would resume the same sessions twice.
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        new = conn.execute("PRAGMA user_version").fetchone()[0] == 0
        if new:
            # auto_vacuum must be chosen before the first table exists.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")  # take the lock now, not at the first commit
        conn.execute("COMMIT")
        conn.execute(f"PRAGMA synchronous = {sync.upper()}")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
        if new:
            conn.executescript(
                f"BEGIN; {_SCHEMA} PRAGMA application_id = {APPLICATION_ID};"
                f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
    except sqlite3.Error as exc:
        conn.close()
        raise _error(where, exc, "cannot prepare it") from exc
    if trace is not None:
        conn.set_trace_callback(trace)
    return conn


def _check_header(target: Path, where: str) -> None:
    try:
        with target.open("rb") as file:
            header = file.read(len(_MAGIC))
    except OSError as exc:
        raise StoreError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    if header and header != _MAGIC:
        raise StoreError(
            f"{where}: is not a securemsg store (not an SQLite database); it was left"
            " untouched, move it away or choose another path"
        )


def _check_contents(path: str, where: str) -> None:
    """Read-only: a read-only connection never writes nor checkpoints the file."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{where}: cannot open it ({exc})") from exc
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if app_id == 0 and version == 0 and tables == 0:
            return  # an empty database: nothing to lose
        if app_id != APPLICATION_ID:
            raise StoreError(
                f"{where}: is an SQLite database of another program, not a securemsg store;"
                " it was left untouched"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{where}: was written by a newer securemsg (store schema {version}, this"
                f" version reads up to {SCHEMA_VERSION}); it was left untouched"
            )
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            # One problem, on one line: SQLite reports some as several lines in one row,
            # headed by "*** in database main ***".
            lines = [line for line in problems[0].splitlines() if line and line[0] != "*"]
            first = (lines or [problems[0]])[0].strip()
            raise StoreError(f"{where}: is corrupt ({first}); it was left untouched")
    except sqlite3.Error as exc:
        raise _error(where, exc, "is corrupt or unreadable") from exc
    finally:
        conn.close()


def _error(where: str, exc: sqlite3.Error, what: str) -> StoreError:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreError(f"{where}: is in use by another securemsg server")
    return StoreError(f"{where}: {what} ({exc}); it was left untouched")


def _create_empty(target: Path, where: str) -> None:
    # Created here, not by sqlite, so that the tokens it will hold are private (0600).
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileNotFoundError:
        raise StoreError(f"{where}: the directory {target.parent} does not exist") from None
    except OSError as exc:
        raise StoreError(f"{where}: cannot create it ({exc.strerror or exc})") from exc


# -- loading, upkeep, closing ----------------------------------------------------------------


def load(conn: sqlite3.Connection) -> Contents:
    """Every session with its rooms, dedup ids and pending messages (seq order)."""
    # Rows of sessions that ended in a batch which also referenced them cannot resume.
    conn.execute("DELETE FROM pending WHERE sid NOT IN (SELECT sid FROM session)")
    filters: dict[str, list[str]] = {}
    for sid, room_filter in conn.execute("SELECT sid, filter FROM membership ORDER BY sid"):
        filters.setdefault(sid, []).append(room_filter)
    ids: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for sid, n, msg_id in conn.execute("SELECT sid, n, msg_id FROM recent_id ORDER BY sid, n"):
        ids.setdefault(sid, []).append(msg_id)
        counts[sid] = n
    pending: dict[str, list[tuple[int, bytes]]] = {}
    prefixes: dict[int, bytes] = {}  # one bytes object per message, shared by its recipients
    rows = conn.execute(
        "SELECT p.sid, p.seq, p.message, coalesce(p.prefix, m.prefix) FROM pending AS p"
        " LEFT JOIN message AS m ON m.id = p.message ORDER BY p.sid, p.seq"
    )
    for sid, seq, message, prefix in rows:
        shared = prefix if message is None else prefixes.setdefault(message, prefix)
        pending.setdefault(sid, []).append((seq, shared))
    sessions = []
    for sid, name, token, acked, expires_at in conn.execute(
        "SELECT sid, name, token, acked, expires_at FROM session ORDER BY sid"
    ):
        mine = pending.get(sid, [])
        sessions.append(
            StoredSession(
                id=sid,
                name=name,
                token=token,
                last_seq=max(acked, mine[-1][0] if mine else 0),
                acked=acked,
                expires_at=expires_at,
                filters=tuple(filters.get(sid, ())),
                recent_ids=tuple(ids.get(sid, ())),
                pending=tuple(mine),
            )
        )
    top = conn.execute("SELECT max(id) FROM message").fetchone()[0]
    return Contents(sessions=sessions, next_message=(top or 0) + 1, id_counts=counts)


def maintain(conn: sqlite3.Connection) -> None:
    """Give free pages back to the file system and fold the WAL into the file."""
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    if free > _FREE_PAGES_KEPT:
        # executescript steps the pragma to the end; execute() frees one page per call.
        conn.executescript("PRAGMA incremental_vacuum;")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def close_file(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        maintain(conn)
    conn.close()
