"""The crash soak of issue 13, small: ``bench/crash_soak.py`` with a few thousand messages,
the server (``--store``) SIGKILLed 3 times and each ``listen --session-file`` process twice.
Nothing acknowledged may be lost, duplicated or reordered at any subscriber, and a restarted
listener repeats at most TAKE_BOUND lines per kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from securemsg.client.sessionfile import TAKE_BOUND

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)


def soak_processes() -> set[int]:
    """Processes of any crash soak (their command lines name its temporary directory)."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if b"securemsg-crash-soak-" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return found


def test_nothing_acknowledged_is_lost_across_server_and_subscriber_kills() -> None:
    before = soak_processes()
    args = ["--messages", "2000", "--rate", "400", "--server-kills", "3",
            "--subscriber-kills", "2", "--seed", "7", "--timeout", "150", "--json"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crash_soak.py"), *args],
        capture_output=True,
        timeout=220,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.stdout, done.stderr.decode()[-3000:]
    # The soak kills and restarts listen processes; none may outlive it (one did: a
    # supervisor's restart and the killer's raced, and the killer orphaned one).
    assert not soak_processes() - before
    result = json.loads(done.stdout.decode().splitlines()[-1])
    print("FIGURE", json.dumps(result))
    assert result["server_kills"] == 3
    subscribers = result["subscribers"]
    assert len(subscribers) == 3
    for name, figures in subscribers.items():
        assert figures["received"] == 2000, (name, figures)
        assert figures["lost"] == figures["duplicated"] == figures["out_of_order"] == 0, name
        assert figures["max_repeated_per_kill"] <= TAKE_BOUND, (name, figures)
        if "(session file" in name:
            assert figures["kills"] == 2, (name, figures)
    assert done.returncode == 0
