"""The Grafana dashboard in docs/ uses only metrics the server exports, and each of its
panels is described in docs/operations.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text(encoding="utf-8"))
OPERATIONS = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def test_every_metric_of_the_dashboard_is_in_the_metric_table() -> None:
    exprs = [t["expr"] for panel in DASHBOARD["panels"] for t in panel["targets"]]
    names = {
        re.sub(r"_(bucket|count|sum)$", "", n)
        for e in exprs
        for n in re.findall(r"securemsg_\w+", e)
    }
    missing = sorted(
        name
        for name in names
        if f"| `{name}`" not in OPERATIONS
        and f"`{name}` |" not in OPERATIONS
        and f", `{name}`" not in OPERATIONS
    )
    assert not missing


def test_every_panel_is_described_in_the_operations_doc() -> None:
    missing = [p["title"] for p in DASHBOARD["panels"] if f"**{p['title']}**" not in OPERATIONS]
    assert not missing
