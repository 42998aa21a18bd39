"""Write docs/benchmarks.md from the results of bench/compare.py."""

# The report is prose for people: the multiplication sign and en dash are meant.
# ruff: noqa: RUF001

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

FINDINGS = Path(__file__).resolve().parent / "findings.md"
PEERS = ("nats", "websockets")
LABEL = {
    "securemsg": "securemsg",
    "nats": "nats-server + nats-py",
    "websockets": "websockets relay",
    "securemsg-store": "securemsg --store (SQLite)",
    "jetstream": "NATS JetStream (file) + nats-py",
}
#: The durable scenario: the session store against JetStream and the in-memory path.
DURABLE = "pubsub-durable"
DURABLE_OURS = "securemsg-store"
DURABLE_PEERS = ("jetstream", "securemsg")

Runs = list[dict[str, Any]]
Getter = Callable[[dict[str, Any]], float | None]
Metric = tuple[str, Callable[[dict[str, Any]], float | None], str, bool]


def _lat(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: (r.get("latency_us") or {}).get(key)


def _extra(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r["extra"].get(key)


def _rate(r: dict[str, Any]) -> float | None:
    # None: an unpaced run that lost, duplicated or reordered something has no figure.
    return None if r["msgs_per_s"] is None else float(r["msgs_per_s"])


def _complete(r: dict[str, Any]) -> float | None:
    return float(not _problems(r))


def _if_complete(get: Callable[[dict[str, Any]], float | None]) -> Getter:
    # The latency of what arrived, when most did not, flatters the run that lost most.
    return lambda r: get(r) if _complete(r) else None


def _problems(r: dict[str, Any]) -> float | None:
    return float(r["lost"] + r["duplicated"] + r["out_of_order"] + r["errors"])


#: (label, value, format, higher is better)
METRICS: dict[str, list[Metric]] = {
    "pubsub": [
        ("deliveries/s", _rate, ",.0f", True),
        ("latency p50 (µs)", _lat("p50"), ",.0f", False),
        ("latency p99 (µs)", _lat("p99"), ",.0f", False),
        ("lost+dup+disorder+errors", _problems, ",.0f", False),
    ],
    "rtt": [
        ("round trips/s", _rate, ",.0f", True),
        ("p50 (µs)", _lat("p50"), ",.0f", False),
        ("p99 (µs)", _lat("p99"), ",.0f", False),
        ("p99.9 (µs)", _lat("p99_9"), ",.0f", False),
        ("lost+errors", _problems, ",.0f", False),
    ],
    "connections": [
        ("server RSS per connection (KB)", _extra("server_rss_kb_per_conn"), ",.1f", False),
        ("alive at the end", _extra("alive"), ",.0f", True),
        ("time to open all (s)", _extra("open_s"), ",.1f", False),
    ],
    "handshakes": [
        ("handshakes/s", _rate, ",.0f", True),
        ("server CPU per handshake (µs)", _extra("server_cpu_us_per_handshake"), ",.0f", False),
        ("client-side open+close p50 (µs)", _lat("p50"), ",.0f", False),
    ],
}
METRICS["fanout"] = METRICS["pubsub"]
#: Format "runs": how many runs of how many (a 0/1 value per run), no ratio.
METRICS["pubsub-unpaced"] = [
    ("deliveries/s, complete runs only", _rate, ",.0f", True),
    ("complete runs (every message once, in order)", _complete, "runs", True),
    ("delivered %", _extra("delivered_pct"), ",.1f", True),
    ("lost+dup+disorder+errors", _problems, ",.0f", False),
    ("published/s (publisher side)", _extra("published_per_s"), ",.0f", True),
    ("latency p50 (µs), complete runs only", _if_complete(_lat("p50")), ",.0f", False),
    ("latency p99 (µs), complete runs only", _if_complete(_lat("p99")), ",.0f", False),
]
METRICS["fanout-unpaced"] = METRICS["pubsub-unpaced"]
METRICS[DURABLE] = [
    ("acknowledged publishes/s (publisher side)", _extra("acked_per_s"), ",.0f", True),
    *METRICS["pubsub-unpaced"],
]

#: The two ways pub/sub is measured: (scenario keys, heading, what it measures in one line).
MODES = (
    (
        ("pubsub-unpaced", "fanout-unpaced"),
        "Pub/sub unpaced, separate processes",
        "Publisher processes publish as fast as their client allows and subscriber processes"
        " count what arrives (as `nats bench` measures): deliveries per second from the first"
        " publish to the last delivery, given only for runs where every message arrived once"
        " and in order.",
    ),
    (
        ("pubsub", "fanout"),
        "Pub/sub paced, one process",
        "Publishers and subscribers share one client process and publishers wait while the"
        " slowest subscriber is more than 1,000 messages behind: the throughput of an"
        " application that paces itself.",
    ),
)


def _values(runs: Runs, get: Callable[[dict[str, Any]], float | None]) -> list[float]:
    return [float(v) for v in (get(r) for r in runs) if v is not None]


def _cell(values: list[float], fmt: str) -> str:
    if fmt == "runs":
        return f"{sum(values):.0f} of {len(values)}"
    if not values:
        return "n/a"
    median = statistics.median(values)
    if len(values) == 1:
        return format(median, fmt)
    return f"{median:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def _ratio(ours: list[float], theirs: list[float]) -> str:
    if not ours or not theirs:
        return "n/a"
    mine, peer = statistics.median(ours), statistics.median(theirs)
    if peer == 0:
        return "n/a" if mine == 0 else "∞"
    return f"{mine / peer:.2f}×"


def _table(
    key: str,
    by_system: dict[str, Runs],
    *,
    ours_key: str = "securemsg",
    peers: tuple[str, ...] = PEERS,
) -> list[str]:
    present = [p for p in peers if p in by_system]
    head = "| metric | " + " | ".join(LABEL[s] for s in by_system)
    head += " | " + " | ".join(f"{ours_key} / {p}" for p in present) + " |"
    lines = [head, "|" + "---|" * (1 + len(by_system) + len(present))]
    for label, get, fmt, higher in METRICS[key]:
        cells = [_cell(_values(runs, get), fmt) for runs in by_system.values()]
        ours = _values(by_system.get(ours_key, []), get)
        ratios = [_ratio(ours, _values(by_system[p], get)) for p in present]
        if fmt == "runs":
            ratios = ["" for _ in ratios]
        better = "higher is better" if higher else "lower is better"
        lines.append(f"| {label} ({better}) | " + " | ".join(cells + ratios) + " |")
    return lines


def _median(runs: Runs, get: Callable[[dict[str, Any]], float | None]) -> float | None:
    values = _values(runs, get)
    return statistics.median(values) if values else None


def _targets(results: dict[str, dict[str, Runs]], target: dict[str, Any] | None) -> list[str]:
    rows: list[tuple[str, str, str]] = []

    def ratio(key: str, peer: str, get: Callable[[dict[str, Any]], float | None]) -> float | None:
        ours, theirs = _median(results[key]["securemsg"], get), _median(results[key][peer], get)
        return ours / theirs if ours is not None and theirs else None

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    if "pubsub" in results:
        r = ratio("pubsub", "nats", _rate)
        rows.append(("pubsub 1→1 ≥ 1.0× NATS", f"{r:.2f}×" if r else "n/a", verdict(r and r >= 1)))
        r = ratio("pubsub", "websockets", _rate)
        rows.append(
            ("pubsub 1→1 ≥ 3× websockets", f"{r:.2f}×" if r else "n/a", verdict(r and r >= 3))
        )
    if "fanout" in results:
        r = ratio("fanout", "nats", _rate)
        rows.append(
            (
                "fanout 1→100 deliveries/s ≥ 1.0× NATS",
                f"{r:.2f}×" if r else "n/a",
                verdict(r and r >= 1),
            )
        )
    if "rtt" in results:
        for q in ("p50", "p99"):
            r = ratio("rtt", "nats", _lat(q))
            rows.append((f"rtt {q} ≤ NATS", f"{r:.2f}×" if r else "n/a", verdict(r and r <= 1)))
    if target is not None:
        per = target["extra"].get("server_rss_kb_per_conn")
        alive = target["extra"].get("alive")
        ok = per is not None and per <= 30 and alive == 10_000
        rows.append(
            (
                "10,000 idle connections, 60 s, all alive, ≤ 30 KB each",
                f"{alive:,.0f} alive, {per} KB each",
                verdict(ok),
            )
        )
    elif "connections" in results:
        per = _median(results["connections"]["securemsg"], _extra("server_rss_kb_per_conn"))
        rows.append(
            (
                "idle connection ≤ 30 KB server RSS (2,000 held)",
                f"{per} KB",
                verdict(per is not None and per <= 30),
            )
        )
    if "handshakes" in results:
        cpu = _median(results["handshakes"]["securemsg"], _extra("server_cpu_us_per_handshake"))
        rows.append(
            (
                "server CPU per handshake ≤ 700 µs",
                f"{cpu:,.0f} µs" if cpu else "n/a",
                verdict(cpu is not None and cpu <= 700),
            )
        )
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines


def _issue15_targets(
    results: dict[str, dict[str, Runs]], target: dict[str, Any] | None
) -> list[str]:
    """Issue 15: unpaced pub/sub at least as fast as NATS, every message delivered; rtt and
    handshake CPU no worse than NATS's; 10,000 idle connections at 25 KB each at most."""
    lines = ["| target | measured | verdict |", "|---|---|---|"]

    def row(title: str, measured: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else ("met" if ok else "**missed**")
        lines.append(f"| {title} | {measured} | {verdict} |")

    for key, title in (("pubsub-unpaced", "pubsub 1→1"), ("fanout-unpaced", "fanout 1→20")):
        if key not in results:
            continue
        ours, nats = results[key].get("securemsg", []), results[key].get("nats", [])
        delivered = min(_values(ours, _extra("delivered_pct")), default=None)
        complete = bool(ours) and all(_complete(r) for r in ours)
        mine, theirs = _median(ours, _rate), _median(nats, _rate)
        ratio = mine / theirs if complete and mine and theirs else None
        measured = f"{ratio:.2f}×" if ratio else "no figure"
        measured += f", {delivered:g} % delivered (worst run)" if delivered is not None else ""
        row(
            f"{title} unpaced ≥ 1.0× NATS, 100 % delivered",
            measured,
            ratio is not None and ratio >= 1.0,
        )
    if "rtt" in results:
        for q in ("p50", "p99"):
            mine = _median(results["rtt"].get("securemsg", []), _lat(q))
            theirs = _median(results["rtt"].get("nats", []), _lat(q))
            ratio = mine / theirs if mine is not None and theirs else None
            row(
                f"request/reply {q} ≤ NATS",
                f"{ratio:.2f}×" if ratio else "n/a",
                ratio and ratio <= 1,
            )
    if target is not None:
        per = target["extra"].get("server_rss_kb_per_conn")
        alive = target["extra"].get("alive")
        row(
            "10,000 idle TLS connections for 60 s: all alive, ≤ 25 KB each",
            f"{alive:,.0f} alive, {per} KB each",
            per is not None and per <= 25 and alive == 10_000,
        )
    if "handshakes" in results:
        get = _extra("server_cpu_us_per_handshake")
        mine = _median(results["handshakes"].get("securemsg", []), get)
        theirs = _median(results["handshakes"].get("nats", []), get)
        measured = f"{mine:,.0f} µs against {theirs:,.0f} µs" if mine and theirs else "n/a"
        row(
            "server CPU per full handshake ≤ NATS's",
            measured,
            bool(mine and theirs and mine <= theirs),
        )
    return lines


def _durable_targets(runs: dict[str, Runs]) -> list[str]:
    """Issue 13: the store at least 2x JetStream's acknowledged publishes and 80 % of the
    in-memory path's pub/sub, every message delivered once and in order."""
    store = runs.get(DURABLE_OURS, [])
    complete = bool(store) and all(_complete(r) for r in store)
    rows = []
    for title, peer, get, aim in (
        ("acknowledged publishes/s ≥ 2× JetStream", "jetstream", _extra("acked_per_s"), 2.0),
        ("deliveries/s ≥ 0.8× securemsg in memory", "securemsg", _rate, 0.8),
    ):
        mine, theirs = _median(store, get), _median(runs.get(peer, []), get)
        ratio = mine / theirs if complete and mine and theirs else None
        measured = f"{ratio:.2f}×" if ratio else "no figure"
        ok = ratio is not None and ratio >= aim
        rows.append(f"| {title}, 100 % delivered | {measured} | {'met' if ok else '**missed**'} |")
    return ["| target | measured | verdict |", "|---|---|---|", *rows]


def _durable(title: str, results: dict[str, dict[str, Runs]]) -> list[str]:
    out = [
        "## Durable pub/sub: the session store, JetStream, memory",
        "",
        "Unpaced pub/sub 1→1 in separate processes, as above, with durable servers:"
        " securemsg with its SQLite session store (`--store`, `store_sync = normal`: a publish"
        " is acknowledged once committed) against nats-server with JetStream file storage"
        " (a stream on the subject; nats-py `publish_async`, 256 publishes in flight, each"
        " acknowledged by the stream; a durable pull consumer in the subscriber process"
        " acking each message), and securemsg in memory for reference. Acknowledged"
        " publishes/s: messages over the time from the first publish to the last"
        " acknowledgement, at the publisher. Ratios are the store / peer.",
        "",
        "### Targets (issue 13)",
        "",
        *_durable_targets(results[DURABLE]),
        "",
        f"### {title}",
        "",
        *_table(DURABLE, results[DURABLE], ours_key=DURABLE_OURS, peers=DURABLE_PEERS),
        "",
    ]
    return out + _notes(DURABLE, results)


def _notes(key: str, results: dict[str, dict[str, Runs]]) -> list[str]:
    notes = sorted(
        {(LABEL[s], n) for s, runs in results[key].items() for r in runs for n in r["notes"]}
    )
    out = [f"Note ({system}): {n}" for system, n in notes[:8]]
    return [*out, ""] if notes else out


def _section(key: str, title: str, results: dict[str, dict[str, Runs]], level: str) -> list[str]:
    return [f"{level} {title}", "", *_table(key, results[key]), "", *_notes(key, results)]


def write_report(
    path: Path,
    *,
    plan: list[tuple[str, str]],
    results: dict[str, dict[str, Runs]],
    sweep: dict[str, Runs],
    target: dict[str, Any] | None,
    rounds: int,
    plot: str | None,
    machine: dict[str, str],
    failures: list[str],
) -> None:
    out = [
        "# Benchmarks",
        "",
        "Generated by `python bench/compare.py` from a real run; do not edit by hand (the",
        "analysis at the end comes from `bench/findings.md`). securemsg, nats-server driven",
        "by nats-py, and a websockets relay, on one machine over loopback, with the same TLS",
        "certificates, 128-byte payloads, counts and pacing, the same verification, and",
        f"{rounds} interleaved rounds. Each cell: median (min–max) over the rounds. Every run",
        "is a fresh server process and a fresh client process. In the paced mode all clients",
        "of a run share that process (one core), the server has the other; in the unpaced",
        "mode the client process starts publisher and subscriber processes of their own",
        "(server, publisher and subscriber on two cores). securemsg runs with acks,",
        "sequence numbers, outbox and heartbeats on, as always; NATS core is at-most-once",
        "(no acks); the relay neither acks nor numbers. Ratios are securemsg / peer.",
        "",
        "## Machine and versions",
        "",
    ]
    out += [f"- {key}: {value}" for key, value in machine.items()]
    out.append("")
    targets = _targets(results, target)
    if len(targets) > 2:  # a table with rows
        out += ["## Targets (issue 6)", "", *targets, ""]
    if any(key in results for key in ("pubsub-unpaced", "fanout-unpaced")):
        out += ["## Targets (issue 15)", "", *_issue15_targets(results, target), ""]
    if failures:
        out += ["Runs that failed or overran their bound (left out of the tables):", ""]
        out += [f"- {f}" for f in failures]
        out.append("")
    titles = dict(plan)
    for keys, heading, measures in MODES:
        if any(key in results for key in keys):
            out += [f"## {heading}", "", measures, ""]
            for key in keys:
                if key in results:
                    out += _section(key, titles[key], results, "###")
    grouped = {DURABLE, *(key for keys, _, _ in MODES for key in keys)}
    if DURABLE in results:
        out += _durable(titles[DURABLE], results)
    for key, title in plan:
        if key in results and key not in grouped:
            out += _section(key, title, results, "##")
    if sweep:
        out += ["## Latency versus offered load", ""]
        if plot:
            out += [f"![latency versus offered load]({plot})", ""]
        out += [
            "| offered msgs/s | "
            + " | ".join(f"{s} achieved | {s} p50 µs | {s} p99 µs" for s in sweep)
            + " |"
        ]
        out += ["|---|" + "---|---|---|" * len(sweep)]
        rates = sorted({r["offered"] for runs in sweep.values() for r in runs})
        for rate in rates:
            cells = []
            for runs in sweep.values():
                found = [r for r in runs if r["offered"] == rate]
                if not found:
                    cells += ["failed", "", ""]
                    continue
                r = found[0]
                lat = r.get("latency_us") or {}
                cells += [
                    f"{r['msgs_per_s']:,.0f}",
                    f"{lat.get('p50', 0):,.0f}",
                    f"{lat.get('p99', 0):,.0f}",
                ]
            out.append(f"| {rate:,} | " + " | ".join(cells) + " |")
        out.append("")
    if FINDINGS.exists():
        out += [FINDINGS.read_text().strip(), ""]
    path.write_text("\n".join(out))
