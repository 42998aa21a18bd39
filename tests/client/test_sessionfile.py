"""The client's session file (client/sessionfile.py) and the mailbox's record of what the
application is done with, without a server: the file is real, the connection is in memory."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import msgspec
import pytest

from securemsg.client.sessionfile import TAKE_BOUND, Saved, SessionFile, keep, read
from securemsg.core.messages import Publish
from securemsg.errors import StoreError
from tests.client.test_client_unit import Pair, message, settle


async def test_a_new_file_is_created_private_and_read_back(tmp_path: Path) -> None:
    path = str(tmp_path / "alice.session")
    file = SessionFile(path)
    assert file.saved is None
    state = Saved(name="alice", session="tok", last_seq=7, next_id=9, outbox=[("9", b"\x00ab")])
    file.start(fingerprint=lambda: 1, snapshot=lambda: state, done_seq=lambda: 7)
    file.write()
    file.close()
    assert read(path) == state
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds the session token
    assert sorted(os.listdir(tmp_path)) == ["alice.session", "alice.session.lock"]  # no .tmp


async def test_a_second_holder_of_the_file_gets_one_sentence(tmp_path: Path) -> None:
    path = str(tmp_path / "alice.session")
    first = SessionFile(path)
    with pytest.raises(StoreError) as caught:
        SessionFile(path)
    assert str(caught.value) == (
        f"session file {path} is in use by another process (it holds {path}.lock); give "
        "each process its own session file"
    )
    first.release()
    SessionFile(path).release()  # free again once the first let go


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x00\x01 not json at all", "is not a securemsg client session file"),
        (b'{"some": "other json"}', "is not a securemsg client session file"),
        (b'{"format":"securemsg-client-session","last_seq":"x"}', "is damaged"),
        (b'{"format":"securemsg-client-session","version":99}', "has format version 99"),
    ],
)
def test_a_file_that_is_not_a_session_file_is_one_sentence_and_left_alone(
    tmp_path: Path, content: bytes, words: str
) -> None:
    path = tmp_path / "odd.session"
    path.write_bytes(content)
    with pytest.raises(StoreError) as caught:
        SessionFile(str(path))
    text = str(caught.value)
    assert words in text and str(path) in text and "\n" not in text
    assert path.read_bytes() == content
    SessionFile(str(path) + "2").release()  # the failed open let go of its lock


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        SessionFile(str(tmp_path))


async def test_the_file_is_written_at_least_every_take_bound_messages(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    done = [0]
    file = SessionFile(path, interval=3600)  # the timer stays out of the way
    file.start(
        fingerprint=lambda: done[0],
        snapshot=lambda: Saved(last_seq=done[0]),
        done_seq=lambda: done[0],
    )
    for seq in range(1, 3 * TAKE_BOUND + 1):
        done[0] = seq
        file.taken()
        kept = read(path)
        assert seq - (kept.last_seq if kept is not None else 0) < TAKE_BOUND
    assert kept is not None and kept.last_seq == 3 * TAKE_BOUND
    file.close()


async def test_the_timer_writes_what_changed_and_nothing_when_idle(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    state = [1]
    file = SessionFile(path, interval=0.01)
    file.start(fingerprint=lambda: state[0], snapshot=lambda: Saved(last_seq=state[0]),
               done_seq=lambda: 0)  # fmt: skip
    state[0] = 2
    await asyncio.sleep(0.1)
    kept = read(path)
    assert kept is not None and kept.last_seq == 2
    before = os.stat(path).st_mtime_ns
    await asyncio.sleep(0.1)
    assert os.stat(path).st_mtime_ns == before  # unchanged: not rewritten
    file.close()


async def test_the_seq_kept_is_the_one_the_application_is_done_with(tmp_path: Path) -> None:
    pair = Pair()
    pair.open()
    mailbox = pair.mailbox
    pair.feed(*(message(seq) for seq in range(1, 6)))
    await settle()
    assert mailbox.done_seq() == 0  # five received, none taken
    assert (await mailbox.receive(1)).seq == 1
    assert mailbox.done_seq() == 0  # taken, maybe still being handled
    assert mailbox.take() is not None  # asking for the next: done with 1
    assert mailbox.done_seq() == 1
    for _ in range(3):
        mailbox.take()
    assert mailbox.done_seq() == 4  # 5 is being handled
    assert mailbox.take() is None
    assert mailbox.done_seq() == 5  # came back for more: done with everything


async def test_a_restored_session_continues_ids_and_resends_its_outbox(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    pair = Pair()
    pair.open()
    file = SessionFile(path)
    keep(file, pair.mailbox, lambda: ("alice", "tok"))
    for n in range(3):
        pair.mailbox.submit(lambda i, n=n: Publish(room="r", body=n, id=i))  # type: ignore[misc]
    file.close()
    kept = read(path)
    assert kept is not None and kept.session == "tok" and kept.next_id == 3
    assert [msg_id for msg_id, _ in kept.outbox] == ["1", "2", "3"]

    successor = Pair()
    successor.mailbox.session.restore(
        last_seq=kept.last_seq, next_id=kept.next_id, outbox=kept.outbox
    )
    successor.open(resumed=True)
    successor.mailbox.submit(lambda i: Publish(room="r", body="new", id=i))
    await settle()
    sent = successor.sent(Publish)
    assert [(p.id, msgspec.json.decode(p.body)) for p in sent] == [
        ("1", 0),
        ("2", 1),
        ("3", 2),
        ("4", "new"),
    ]
