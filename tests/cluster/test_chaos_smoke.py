"""``bench/cluster_chaos.py`` with tiny counts: nats-server and three nodes, a few hundred
numbered messages while nodes are SIGKILLed and restarted twice. Nothing acknowledged may be
lost, duplicated or reordered at any subscriber; speed is not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from securemsg.bench.cluster import nats_server_path
from securemsg.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(nats_server_path() is None, reason="nats-server is not on PATH"),
    pytest.mark.skipif(
        "cluster" not in ServerConfig.__struct_fields__, reason="no server --cluster here"
    ),
]


def test_a_small_chaos_run_loses_duplicates_and_reorders_nothing() -> None:
    args = ["--messages", "600", "--rate", "300", "--kills", "2", "--down", "0.3",
            "--publishers", "1", "--subscribers", "3", "--idle-timeout", "10",
            "--timeout", "60", "--json"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cluster_chaos.py"), *args],
        capture_output=True,
        timeout=80,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.stdout, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout.decode().splitlines()[-1])
    print("FIGURE", json.dumps(result))
    assert result["kills"] == 2
    assert not any(p["error"] for p in result["publisher_results"])
    figures = result["subscriber_figures"]
    assert len(figures) == 3
    for name, f in figures.items():
        assert f["received"] == 600, (name, f)
        assert f["lost"] == f["duplicated"] == f["out_of_order"] == f["errors"] == 0, name
    assert sum(f["reconnects"] for f in figures.values()) >= 1  # a kill moved someone
    assert done.returncode == 0
