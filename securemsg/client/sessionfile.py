"""A client session kept in a file, so that a restarted *process* resumes it.

``connect(..., session_file=PATH)`` keeps in ``PATH`` what a new process needs to take the
session over: the name, the session token, the ``seq`` up to which the application is done
with every message, and the unacknowledged outbox (each frame with its id, and the next id,
so that new requests never reuse an id the server remembers). On start the client resumes
that session (``hello`` with token and ``last_seq``) and resends the outbox; the server
drops what it already carried out by id.

Theory of operation
-------------------
- **Done, not received.** The ``seq`` kept is the last message the application is done
  with: every message taken before its latest ``receive()`` (or ``async for`` step), and
  the last one too once it asks for the next or closes (:meth:`Mailbox.done_seq`). So the
  file never claims a message the application had not taken; the server, which replays
  from what the client acknowledged (what the application took), is the one that decides
  where a successor starts, and the file only has to stay behind it.
- **Bounded repeats.** The file is rewritten at least every :data:`TAKE_BOUND` messages the
  application is done with (synchronously, before it gets the next one), so a restart
  repeats at most that many messages the dead process had finished with (for ``listen``:
  at most the last 20 lines it printed).
- **Bounded rate.** Anything else (the outbox, the session token, a slower consumer) is
  written by a timer at most every :data:`WRITE_INTERVAL` seconds, only when it changed,
  and once more on close. A publish not yet written nor acknowledged dies with the process:
  ``flush()`` or ``confirm=True`` is the point after which a publish survives.
- **Atomic.** Written to ``PATH.tmp``, fsynced, renamed over ``PATH``: a crash leaves the
  old file or the new one, never a mix. The timer's and the last write also fsync the
  directory; the every-:data:`TAKE_BOUND` writes do not (a third of the cost), so after a
  power loss (not a kill) the file may be up to :data:`WRITE_INTERVAL` older: more
  repeats, never a loss.
- **One process.** ``PATH.lock`` is held with an exclusive ``flock`` for the client's life;
  a second process gets :class:`~securemsg.errors.StoreError` in one sentence instead of a
  shared session. The kernel drops the lock when the process dies, however it dies.
- **Bounded size.** The outbox holds at most ``max_outbox`` frames of at most the
  server's ``max_frame`` each; nothing else grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable, Hashable
from typing import Final

import msgspec
import structlog

from securemsg.client.mailbox import Mailbox
from securemsg.errors import StoreError

__all__ = [
    "TAKE_BOUND",
    "WRITE_INTERVAL",
    "Saved",
    "SessionFile",
    "keep",
    "open_session_file",
    "saved_name",
]

#: Messages the application may be done with before the file must record them.
TAKE_BOUND: Final = 20
#: Shortest time in seconds between two writes for anything but :data:`TAKE_BOUND`.
WRITE_INTERVAL: Final = 0.2
_FORMAT: Final = "securemsg-client-session"
_VERSION: Final = 1


class Saved(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the file holds (JSON; frames base64)."""

    format: str = _FORMAT
    version: int = _VERSION
    name: str | None = None
    session: str | None = None
    last_seq: int = 0
    next_id: int = 0
    outbox: list[tuple[str, bytes]] = msgspec.field(default_factory=list)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Saved).decode


class SessionFile:
    """One open session file: locked on creation, read, then written by :meth:`start`'s
    timer, :meth:`taken` and :meth:`close`."""

    def __init__(self, path: str, *, interval: float = WRITE_INTERVAL) -> None:
        self.path = path
        self._interval = interval
        self._lock_fd: int | None = _lock(path)
        try:
            #: What the file held when opened; None for a new file.
            self.saved = read(path)
        except BaseException:
            self.release()
            raise
        self._recorded = self.saved.last_seq if self.saved is not None else 0
        self._written: Hashable = None
        self._fingerprint: Callable[[], Hashable] | None = None
        self._snapshot: Callable[[], Saved] | None = None
        self._done_seq: Callable[[], int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._directory_synced = True

    def start(
        self,
        *,
        fingerprint: Callable[[], Hashable],
        snapshot: Callable[[], Saved],
        done_seq: Callable[[], int],
    ) -> None:
        """Write whenever ``fingerprint()`` changes (at most every ``interval`` seconds),
        ``snapshot()`` being what to write; :meth:`taken` compares ``done_seq()``."""
        self._fingerprint, self._snapshot, self._done_seq = fingerprint, snapshot, done_seq
        self._written = None  # the first tick writes: the session may be new
        self._tick()

    def taken(self) -> None:
        """The application took a message: write now if :data:`TAKE_BOUND` messages it is
        done with are not in the file yet."""
        if self._done_seq is not None and self._done_seq() - self._recorded >= TAKE_BOUND:
            # The directory is not fsynced here: a kill keeps the rename anyway, and a power
            # loss may at worst bring back an older complete file (more repeats, no loss).
            self.write(sync_directory=False)

    def write(self, *, sync_directory: bool = True) -> None:
        """Write the current state now (raises :class:`StoreError` when it cannot)."""
        if self._snapshot is None or self._fingerprint is None or self._lock_fd is None:
            return
        saved = self._snapshot()
        fingerprint = self._fingerprint()
        _write(self.path, _encode(saved), sync_directory=sync_directory)
        self._directory_synced = sync_directory
        self._recorded = saved.last_seq
        self._written = fingerprint

    def close(self) -> None:
        """Write the last state and let go of the lock; later calls do nothing."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.write()
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the lock without writing."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def _tick(self) -> None:
        self._timer = None
        if self._lock_fd is None or self._fingerprint is None:
            return
        try:
            if self._fingerprint() != self._written:
                self.write()
            elif not self._directory_synced:
                _sync_directory(self.path)
                self._directory_synced = True
        except StoreError as exc:  # the next tick tries again; taken() raises it
            structlog.get_logger("securemsg.client.sessionfile").warning(
                "session_file_write_failed", error=str(exc)
            )
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)


def open_session_file(
    path: str, *, name: str | None, mailbox: Mailbox
) -> tuple[SessionFile, str | None, str | None]:
    """Lock and read ``path`` and give ``mailbox`` the session it kept: returns the file, the
    name to use (``name``, else the one kept) and the session token to resume (or None).
    A file kept for another name raises :class:`StoreError`."""
    file = SessionFile(path)
    saved = file.saved
    if saved is None:
        return file, name, None
    if name is not None and saved.name is not None and saved.name != name:
        file.release()
        raise StoreError(
            f"session file {path} holds the session of {saved.name!r}, not {name!r}; give "
            "each client its own session file"
        )
    mailbox.session.restore(last_seq=saved.last_seq, next_id=saved.next_id, outbox=saved.outbox)
    return file, name if name is not None else saved.name, saved.session


def keep(
    file: SessionFile, mailbox: Mailbox, who: Callable[[], tuple[str | None, str | None]]
) -> None:
    """Start writing ``mailbox``'s session to ``file``; ``who()`` gives the name and the
    session token."""
    session = mailbox.session

    def fingerprint() -> Hashable:
        return (who(), session.last_id, len(session.outbox), mailbox.done_seq())

    def snapshot() -> Saved:
        name, token = who()
        outbox = session.outbox
        return Saved(
            name=name,
            session=token,
            last_seq=mailbox.done_seq(),
            next_id=outbox.next_id,
            outbox=outbox.entries(),
        )

    file.start(fingerprint=fingerprint, snapshot=snapshot, done_seq=mailbox.done_seq)
    mailbox.on_taken = file.taken


def read(path: str) -> Saved | None:
    """The session kept in ``path``; None when there is no such file. A file that is not a
    session file of ours raises :class:`StoreError` in one sentence and stays as it is."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise StoreError(f"session file {path} is a directory; give the path of a file") from None
    except OSError as exc:
        raise StoreError(f"session file {path} cannot be read: {exc.strerror}") from None
    try:
        saved = _decode(data)
    except msgspec.ValidationError as exc:
        if b'"format":"' + _FORMAT.encode() in data:
            raise StoreError(
                f"session file {path} is damaged ({exc}); move it away to start a new session"
            ) from None
        raise StoreError(_foreign(path)) from None
    except msgspec.DecodeError:
        raise StoreError(_foreign(path)) from None
    if saved.format != _FORMAT:
        raise StoreError(_foreign(path))
    if saved.version != _VERSION:
        raise StoreError(
            f"session file {path} has format version {saved.version}, this securemsg reads "
            f"version {_VERSION}; move it away to start a new session"
        )
    return saved


def saved_name(path: str) -> str | None:
    """The name kept in ``path``, or None (no file, or one :class:`SessionFile` will
    refuse with its reason)."""
    with contextlib.suppress(StoreError):
        saved = read(path)
        return saved.name if saved is not None else None
    return None


def _foreign(path: str) -> str:
    return (
        f"session file {path} is not a securemsg client session file; give another path or "
        "move it away"
    )


def _lock(path: str) -> int:
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"session file {path}: cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"session file {path} is in use by another process (it holds {lock_path}); "
            "give each process its own session file"
        ) from None
    return fd


def _write(path: str, data: bytes, *, sync_directory: bool) -> None:
    """Replace ``path`` by ``data`` atomically: whatever survives is a whole file. With
    ``sync_directory`` the new file is also the one a power loss leaves."""
    tmp = path + ".tmp"
    try:
        # Private: the session token lets whoever reads it take the session over.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:  # bounded: each write takes at least one byte or raises
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"session file {path} cannot be written: {exc.strerror}") from None
    if sync_directory:
        _sync_directory(path)


def _sync_directory(path: str) -> None:
    """Make the last rename in ``path``'s directory survive a power loss."""
    try:
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise StoreError(f"session file {path} cannot be written: {exc.strerror}") from None
