"""Turn a results JSON into the summary (figures against the targets), a Markdown table and a
PNG chart of throughput and latency.

    python bench/report.py bench/results/latest.json     # rewrites latest.md and latest.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

Doc = dict[str, Any]


def _get(doc: Doc, *path: str | int) -> Any:
    node: Any = doc
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return None
    return node


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or (isinstance(b, float) and math.isnan(b)):
        return None
    return a / b


def _row(
    figure: str,
    engine: str,
    value: float | None,
    unit: str,
    *,
    op: str | None = None,
    threshold: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    ok: bool | None = None
    miss = ""
    if op is not None and threshold is not None and value is not None:
        if op == ">=":
            ok = value >= threshold
            if not ok:
                miss = (
                    f"missed by {(1 - value / threshold):.0%}: {value:.2f}{unit} is "
                    f"{value / threshold:.0%} of the ≥ {threshold:g}{unit} target "
                    f"({threshold / value:.1f}× short)"
                    if value
                    else "missed: nothing measured"
                )
        else:
            ok = value <= threshold
            if not ok:
                miss = (
                    f"missed: {value:.3g}{unit} is {value / threshold:.1f}× the "
                    f"≤ {threshold:g}{unit} target"
                )
    return {
        "figure": figure,
        "engine": engine,
        "value": value,
        "unit": unit,
        "target": f"{op} {threshold:g}{unit}" if op and threshold is not None else "",
        "ok": ok,
        "miss": miss,
        "note": note,
    }


def _io_note(background: dict[str, Any]) -> str:
    """ ", disk waits 3 %" from wait_quiet's I/O stall share (absent in older results)."""
    stalled = background.get("io_stalled")
    return "" if stalled is None else f", disk waits {float(stalled):.0%}"


def _count(value: int | None) -> str:
    """A backlog size for a label; '?' when the phase did not run."""
    return f"{value:,}" if value else "?"


def _runs(phases: Doc, phase: str) -> str:
    """ "best of 19,923 / 25,101 / 30,480" for a phase measured several times, else ""."""
    runs = _get(phases, phase, "runs")
    if not isinstance(runs, list) or len(runs) < 2:
        return ""
    return "best of " + " / ".join(f"{float(r or 0):,.0f}" for r in runs)


def _deliveries_note(per_s: float | None, runs: str) -> str:
    """ "4031 deliveries/s (best of 3,117 / 4,031 / 3,800 deliveries/s)" or less."""
    if not per_s:
        return ""
    return f"{per_s:.0f} deliveries/s" + (f" ({runs} deliveries/s)" if runs else "")


def summarize(doc: Doc) -> dict[str, Any]:
    """Every headline figure, with its target and by how much it is missed."""
    p = doc.get("phases", {})
    pg_version = str(_get(doc, "meta", "machine", "postgresql") or "?").split(" (")[0]
    pg = f"PostgreSQL {pg_version}"
    lite = f"SQLite {_get(doc, 'meta', 'machine', 'sqlite') or '?'}"
    ceiling_http = _get(p, "ceiling_http", "rps")
    ceiling_client = _get(p, "ceiling_client", "rps")
    ceiling_starlette = _get(p, "ceiling_starlette", "rps")
    ingest_pg = _get(p, "ingest_postgresql", "full", "committed_per_s")
    ingest_lite = _get(p, "ingest_sqlite", "full", "committed_per_s")
    ingest_base = _get(p, "ingest_baseline", "full", "committed_per_s")
    rows = [
        _row(
            "ceiling: bare HTTP (trivial ASGI app), req/s",
            "none",
            ceiling_http,
            " /s",
            note=_runs(p, "ceiling_http"),
        ),
        _row(
            "ceiling: trivial Starlette route (the issue's reference), req/s",
            "none",
            ceiling_starlette,
            " /s",
            note=_runs(p, "ceiling_starlette"),
        ),
        _row(
            "ceiling: delivery client (HttpConnector → sink), req/s",
            "none",
            ceiling_client,
            " /s",
            note=_runs(p, "ceiling_client"),
        ),
        _row(
            "ingest: accepted events/s (committed rows)",
            pg,
            ingest_pg,
            " /s",
            note=_runs(p, "ingest_postgresql"),
        ),
        _row(
            "ingest ÷ bare-HTTP ceiling",
            pg,
            _ratio(ingest_pg, ceiling_http),
            "×",
            op=">=",
            threshold=0.5,
        ),
        _row(
            "ingest ÷ trivial-Starlette-route ceiling (context, not the target)",
            pg,
            _ratio(ingest_pg, ceiling_starlette),
            "×",
        ),
        _row(
            "ingest p99 at 50 % of that rate (open loop)",
            pg,
            _get(p, "ingest_postgresql", "half", "latency_ms", "p99"),
            " ms",
            op="<=",
            threshold=20,
        ),
        _row(
            "ingest: accepted events/s (committed rows)",
            lite,
            ingest_lite,
            " /s",
            note=_runs(p, "ingest_sqlite"),
        ),
        _row(
            "ingest ÷ bare-HTTP ceiling",
            lite,
            _ratio(ingest_lite, ceiling_http),
            "×",
            op=">=",
            threshold=0.6,
        ),
        _row(
            "ingest ÷ trivial-Starlette-route ceiling (context, not the target)",
            lite,
            _ratio(ingest_lite, ceiling_starlette),
            "×",
        ),
        _row(
            "ingest p99 at 50 % of that rate (open loop)",
            lite,
            _get(p, "ingest_sqlite", "half", "latency_ms", "p99"),
            " ms",
        ),
        _row(
            "baseline ingest: tasks queued/s (FastAPI + Celery)",
            "Redis",
            ingest_base,
            " /s",
            note=_runs(p, "ingest_baseline"),
        ),
        _row(
            "server CPU per request, bare-HTTP ceiling",
            "none",
            _get(p, "ceiling_http", "server_cpu_us_per_request"),
            " µs",
        ),
        _row(
            "server CPU per accepted event, ingest at full speed",
            pg,
            _get(p, "ingest_postgresql", "full", "server_cpu_us_per_event"),
            " µs",
        ),
        _row(
            "server CPU per accepted event, ingest at 50 %",
            pg,
            _get(p, "ingest_postgresql", "half", "server_cpu_us_per_event"),
            " µs",
        ),
        _row(
            "server CPU per accepted event, ingest at full speed",
            lite,
            _get(p, "ingest_sqlite", "full", "server_cpu_us_per_event"),
            " µs",
        ),
        _row(
            "server CPU per accepted event, ingest at full speed",
            "Redis (FastAPI + Celery)",
            _get(p, "ingest_baseline", "full", "server_cpu_us_per_event"),
            " µs",
        ),
        _row(
            "CPU-normalised ingest ÷ ceiling (ceiling µs/req ÷ ingest µs/event)",
            pg,
            _ratio(
                _get(p, "ceiling_http", "server_cpu_us_per_request"),
                _get(p, "ingest_postgresql", "full", "server_cpu_us_per_event"),
            ),
            "×",
            note="insensitive to other load on the machine",
        ),
        _row("ingest: estafeta ÷ baseline", pg, _ratio(ingest_pg, ingest_base), "×"),
    ]
    for fanout in (1, 3):
        est = _get(p, f"e2e_estafeta_f{fanout}", "full")
        base = _get(p, f"e2e_baseline_f{fanout}", "full")
        est_dps = _get(est or {}, "deliveries_per_s")
        rows += [
            _row(
                f"end to end fan-out {fanout}: delivered events/s",
                pg,
                _get(est or {}, "events_per_s"),
                " /s",
                note=_deliveries_note(est_dps, _runs(p, f"e2e_estafeta_f{fanout}")),
            ),
            _row(
                f"end to end fan-out {fanout}: deliveries/s ÷ delivery-client ceiling",
                pg,
                _ratio(est_dps, ceiling_client),
                "×",
                op=">=",
                threshold=0.5,
            ),
            _row(
                f"end to end fan-out {fanout}: ingest → arrival p50 at 50 % rate",
                pg,
                _get(p, f"e2e_estafeta_f{fanout}", "half", "latency_ms", "p50"),
                " ms",
            ),
            _row(
                f"end to end fan-out {fanout}: ingest → arrival p99 at 50 % rate",
                pg,
                _get(p, f"e2e_estafeta_f{fanout}", "half", "latency_ms", "p99"),
                " ms",
            ),
            _row(
                f"baseline end to end fan-out {fanout}: delivered events/s",
                "Redis",
                _get(base or {}, "events_per_s"),
                " /s",
                note=_deliveries_note(
                    _get(base or {}, "deliveries_per_s"), _runs(p, f"e2e_baseline_f{fanout}")
                ),
            ),
            _row(
                f"end to end fan-out {fanout}: estafeta ÷ baseline",
                pg,
                _ratio(_get(est or {}, "events_per_s"), _get(base or {}, "events_per_s")),
                "×",
                op=">=",
                threshold=5,
            ),
        ]
    small = _get(p, "backlog", "small")
    large = _get(p, "backlog", "large")
    lease_small = _get(p, "backlog", "lease_small", "p50_ms")
    lease_large = _get(p, "backlog", "lease_large", "p50_ms")
    drain_small = _get(p, "backlog", "drain_small", "deliveries_per_s")
    drain_large = _get(p, "backlog", "drain_large", "deliveries_per_s")
    rows += [
        _row(f"lease of 100, p50, {_count(small)} pending", pg, lease_small, " ms"),
        _row(f"lease of 100, p50, {_count(large)} pending", pg, lease_large, " ms"),
        _row(
            "lease latency ratio (large ÷ small backlog)",
            pg,
            _ratio(lease_large, lease_small),
            "×",
            op="<=",
            threshold=1.5,
        ),
        _row(f"worker drain, {_count(small)} pending, deliveries/s", pg, drain_small, " /s"),
        _row(f"worker drain, {_count(large)} pending, deliveries/s", pg, drain_large, " /s"),
        _row("drain rate ratio (large ÷ small backlog)", pg, _ratio(drain_large, drain_small), "×"),
        _row(
            f"worker peak RSS while draining, {_count(large)} pending",
            pg,
            _get(p, "backlog", "drain_large", "peak_rss_mb"),
            " MB",
            op="<=",
            threshold=300,
        ),
    ]
    checked = [r for r in rows if r["ok"] is not None]
    return {
        "cores": _get(doc, "meta", "machine", "cpu_count"),
        "rows": rows,
        "targets_met": sum(1 for r in checked if r["ok"]),
        "targets_checked": len(checked),
        "phases_failed": sorted(doc.get("errors", {})),
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "×":
        return f"{value:.2f}×"
    if unit.strip() == "/s":
        return f"{value:,.0f}/s"
    return f"{value:,.1f}{unit}" if value < 100 else f"{value:,.0f}{unit}"


def one_line(phase: str, result: Doc) -> str:
    """A console summary of one phase's result."""
    if phase.startswith("ceiling"):
        return f"{result.get('rps', 0):,.0f} req/s, p99 {_get(result, 'latency_ms', 'p99'):.1f} ms"
    if phase.startswith("ingest"):
        full, half = result.get("full", {}), result.get("half", {})
        return (
            f"{full.get('committed_per_s', 0):,.0f} committed/s (wrk p99 "
            f"{_get(full, 'latency_ms', 'p99'):.1f} ms); "
            f"at {_get(half, 'target_rate') or 0:,.0f}/s "
            f"p99 {_get(half, 'latency_ms', 'p99') or float('nan'):.1f} ms"
        )
    if phase.startswith("e2e"):
        full, half = result.get("full", {}), result.get("half", {})
        return (
            f"{full.get('events_per_s', 0):,.0f} events/s ({full.get('deliveries_per_s', 0):,.0f}"
            f" deliveries/s, drained={full.get('drained')}); at {half.get('rate', 0):,.0f}/s "
            f"p50 {_get(half, 'latency_ms', 'p50') or float('nan'):.1f} ms, p99 "
            f"{_get(half, 'latency_ms', 'p99') or float('nan'):.1f} ms"
        )
    if phase == "backlog":
        return (
            f"lease p50 {_get(result, 'lease_small', 'p50_ms'):.2f} ms → "
            f"{_get(result, 'lease_large', 'p50_ms'):.2f} ms; drain "
            f"{_get(result, 'drain_small', 'deliveries_per_s'):,.0f}/s → "
            f"{_get(result, 'drain_large', 'deliveries_per_s'):,.0f}/s; peak RSS "
            f"{_get(result, 'drain_large', 'peak_rss_mb'):.0f} MB"
        )
    return ""


def markdown(doc: Doc, results_dir: Path) -> str:
    meta = doc["meta"]
    m = meta["machine"]
    s = doc["summary"]
    settings = meta["settings"]
    lines = [
        f"# estafeta benchmark — {meta['started'][:19]}Z{' (quick)' if settings['quick'] else ''}",
        "",
        f"**{m['cpu_count']} cores** ({m['cpu_model']}), Python {m['python']}, "
        f"PostgreSQL {m['postgresql']}, SQLite {m['sqlite']}, Redis {m['redis']}, {m['wrk']}; "
        f"commit `{m['git_commit'][:12]}`{' + uncommitted changes' if m['git_dirty'] else ''}. "
        f"Server on core {settings['server_cpu']}, load tool and sink on core "
        f"{settings['load_cpu']} (taskset); PostgreSQL and Redis unpinned. "
        f"{settings['load_seconds']:g} s of load per measurement; run took "
        f"{meta['duration_s']:.0f} s.",
        *_host_lines(meta.get("host")),
        "",
        f"Targets met: **{s['targets_met']} of {s['targets_checked']}**"
        + (f"; phases failed: {', '.join(s['phases_failed'])}" if s["phases_failed"] else ""),
        "",
        "| figure | engine | measured | target | verdict |",
        "|---|---|---:|---|---|",
    ]
    for r in s["rows"]:
        verdict = "" if r["ok"] is None else ("met" if r["ok"] else f"**{r['miss']}**")
        value = _fmt(r["value"], r["unit"]) + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {r['figure']} | {r['engine']} | {value} | {r['target']} | {verdict} |")
    lines += [
        "",
        "## Latency (ms)",
        "",
        "| run | load | p50 | p99 | p99.9 |",
        "|---|---|---:|---:|---:|",
    ]
    for label, load, lat in _latency_rows(doc):
        lines.append(
            f"| {label} | {load} | {_fmt(lat.get('p50'), '')} | {_fmt(lat.get('p99'), '')} | "
            f"{_fmt(lat.get('p99.9'), '')} |"
        )
    lines += [
        "",
        "Ingest at full speed: wrk closed loop (latency from request write). At 50 %: "
        "bench/loadgen.py open loop at a constant rate, latency from when each request was due "
        "(no coordinated omission). End to end: arrival − sent, computed by the sink from the "
        "send time stamped in the body. See bench/README.md.",
    ]
    lines += [
        "",
        "## Conditions per phase",
        "",
        "Background = CPU busy on the machine just before the phase, with nothing of the "
        "benchmark running (other people's work on a shared machine), and the share of that "
        "second in which some task waited for the disk (writeback an earlier phase left; "
        "each phase waits up to 45 s for both to settle). During = cores used "
        "during the measured load by the processes named, `other` being everything that is "
        "neither the benchmark nor PostgreSQL/Redis.",
        "",
        "| phase | background before | load tool (cores) | during (cores) |",
        "|---|---:|---:|---|",
    ]
    for phase, result in doc.get("phases", {}).items():
        bg = result.get("background_before", {})
        during = (
            _get(result, "cpu_cores")
            or _get(result, "full", "cpu_cores")
            or _get(result, "drain_large", "cpu_cores")
        )
        shown = ", ".join(f"{k} {v:.2f}" for k, v in (during or {}).items() if v >= 0.01)
        tool = (
            _get(result, "own_cores")
            or _get(result, "full", "own_cores")
            or _get(result, "full", "load", "own_cores")
        )
        lines.append(
            f"| {phase} | {bg.get('background_cores', float('nan')):.2f} cores"
            f"{_io_note(bg)} (waited {bg.get('waited_s', 0):.0f} s) | {_fmt(tool, '')}"
            f"{' (the client measured)' if phase == 'ceiling_client' else ''} | {shown} |"
        )
    lines += saturated_load_tools(doc)
    lines += why_missed(doc, results_dir)
    if doc.get("errors"):
        lines += ["", "## Failed phases", ""]
        for phase, error in doc["errors"].items():
            lines.append(f"* `{phase}`: {error.strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


# A load tool using this much of its core may be late to send or to read answers: the
# latencies it reports then include its own delays (the open-loop generator once spun its
# core at every rate over 1,000/s and nothing in the report said so).
SATURATED_TOOL_CORES = 0.9


def saturated_load_tools(doc: Doc) -> list[str]:
    """A warning for each load measurement whose tool used nearly all of its core."""
    found = []
    for phase, result in doc.get("phases", {}).items():
        if phase == "ceiling_client":
            continue  # there the client is what is measured, and it should be busy
        for part in ("full", "half"):
            for path in ((part,), (part, "load")):
                cores = _get(result, *path, "own_cores")
                if isinstance(cores, int | float) and cores >= SATURATED_TOOL_CORES:
                    found.append(
                        f"* `{phase}` {part}: the load tool used {cores:.2f} of its core; the "
                        "latencies it reports include its own delays"
                    )
    if not found:
        return []
    return ["", "**Load tools near saturation**", "", *found]


def _host_lines(host: Doc | None) -> list[str]:
    """The host probe (bench/host_probe.py), before and after the phases, in one sentence."""
    seen = {
        when: probe
        for when, probe in (host or {}).items()
        if isinstance(probe, dict) and "warm_us" in probe
    }
    if not seen:
        return []
    told = "; ".join(
        f"{when} the phases {p['warm_us']:g} µs back to back, {p['slowdown_1ms']:g}× as long "
        f"after 1 ms of idle, {p['slowdown_5ms']:g}× after 5 ms"
        for when, p in seen.items()
    )
    disk = "; ".join(
        f"{when} the phases p50 {p['fsync_p50_ms']:g} ms, p99.9 {p['fsync_p999_ms']:g} ms, "
        f"worst {p['fsync_max_ms']:g} ms ({p['fsync_over_50ms']} of {p['fsync_count']:,} "
        f"over 50 ms)"
        for when, p in seen.items()
        if "fsync_max_ms" in p
    )
    disk_sentence = (
        f" The disk made an 8 KiB write durable (fdatasync, what each commit waits for) in: "
        f"{disk}. A commit waits for its slowest fsync, and so does every request batched with "
        f"it: a stall of the disk is a step in the ingest latency tail whatever the code."
        if disk
        else ""
    )
    return [
        "",
        f"Host: the same piece of Python work (parse, sign, re-encode one webhook body) took "
        f"{told}. A core that idles comes back cold on this host, so CPU per event at partial "
        f"load and latency tails depend on the hour as much as on the code "
        f"(bench/host_probe.py).{disk_sentence}",
    ]


def _per_unit(cores: float | None, rate: float | None) -> float | None:
    """CPU microseconds per event (or delivery) from cores used and events per second."""
    return cores * 1e6 / rate if cores and rate else None


def _missed(summary: Doc, figure: str, engine_prefix: str) -> bool:
    return any(
        r["figure"] == figure and r["engine"].startswith(engine_prefix) and r["ok"] is False
        for r in summary["rows"]
    )


def _machine_bound(
    cores: int | None,
    ceiling: float | None,
    threshold: float,
    parts: list[tuple[str, float | None]],
    *,
    unit: str = "event",
) -> str:
    """The fastest this could go if every core of the machine were busy with it all the
    time: the cores' CPU ÷ what the parts (the load tool, the database, the server …) spend
    per `unit`. Below the target, the target is out of reach for the design, not for tuning."""
    spent = [(name, us) for name, us in parts if us]
    if not cores or not ceiling or len(spent) < len(parts):  # a part not measured: no bound
        return ""
    total = sum(us for _, us in spent)
    bound = cores * 1e6 / total
    listed = ", ".join(f"{name} {us:,.0f}" for name, us in spent)
    verdict = "short of the target even then" if bound < threshold * ceiling else "in reach"
    return (
        f" Even if the machine's {cores} cores did nothing else and never idled, the "
        f"{total:,.0f} µs of CPU per {unit} "
        f"({listed}) allow at most {bound:,.0f}/s, {bound / ceiling:.2f}× of the ceiling: "
        f"{verdict}."
    )


def why_missed(doc: Doc, results_dir: Path) -> list[str]:
    """Why each missed ratio target is missed, in this run's own CPU figures (steadier than
    throughput on a shared host), then the top of each committed profile."""
    p = doc.get("phases", {})
    s = doc["summary"]
    lines: list[str] = []
    per_request = _get(p, "ceiling_http", "server_cpu_us_per_request")
    for phase, engine, threshold in (
        ("ingest_postgresql", "PostgreSQL", 0.5),
        ("ingest_sqlite", "SQLite", 0.6),
    ):
        if not per_request or not _missed(s, "ingest ÷ bare-HTTP ceiling", engine):
            continue
        full = _get(p, phase, "full") or {}
        spent = _get(full, "server_cpu_us_per_event")
        if not spent:
            continue
        budget = per_request / threshold
        line = (
            f"* **ingest, {engine}**: the server spent {spent:,.0f} µs of CPU per accepted "
            f"event; at ≥ {threshold}× of the ceiling it may spend {budget:,.0f} µs "
            f"({per_request:.1f} µs per bare request ÷ {threshold}): {spent / budget:.1f}× over."
        )
        database = _per_unit(_get(full, "cpu_cores", "postgresql"), _get(full, "committed_per_s"))
        if engine == "PostgreSQL" and database:
            line += f" PostgreSQL spent another {database:,.0f} µs per event."
        line += _machine_bound(
            s.get("cores"),
            _get(p, "ceiling_http", "rps"),
            threshold,
            [
                ("the load tool", _per_unit(full.get("own_cores"), full.get("rps"))),
                *([("PostgreSQL", database)] if engine == "PostgreSQL" else []),
                ("the server", spent),
            ],
        )
        lines.append(line)
    client = _get(p, "ceiling_client", "client_cpu_us_per_request")
    ceiling = _get(p, "ceiling_client", "rps")
    for fanout in (1, 3):
        figure = f"end to end fan-out {fanout}: deliveries/s ÷ delivery-client ceiling"
        full = _get(p, f"e2e_estafeta_f{fanout}", "full") or {}
        cores = next(
            (v for k, v in (full.get("cpu_cores") or {}).items() if k.startswith("estafeta")),
            None,
        )
        rate = full.get("deliveries_per_s")
        spent = _per_unit(cores, rate)
        if not _missed(s, figure, "PostgreSQL") or not spent or not ceiling or not cores:
            continue
        budget = cores * 1e6 / (0.5 * ceiling)
        line = (
            f"* **end to end, fan-out {fanout}**: one server process ingests and delivers; it "
            f"spent {spent:,.0f} µs of CPU per delivery (its share of ingest included) on "
            f"the {cores:.2f} cores it got; at 0.5× of the {ceiling:,.0f}/s client ceiling that "
            f"is {budget:,.0f} µs: {spent / budget:.1f}× over."
        )
        if client:
            line += (
                f" The delivery client alone spends {client:,.0f} µs per request, the rest"
                f" {max(spent - client, 0):,.0f}: the ratio is at most the client's share of"
                " the server's CPU per delivery, so an hour that speeds the client more than the"
                " rest lowers it (0.5× needs the rest to cost no more than the client)."
            )
        bound = 1e6 / spent / ceiling
        line += (
            f" With its core to itself and never idle it would reach {bound:.2f}× of the "
            f"ceiling{'' if bound >= 0.5 else ': short of the target even then'}."
        )
        # The core is not the server's alone: PostgreSQL, the sink and the load tool need
        # the other one, and when it is full the server waits on its commits and its sends.
        load = full.get("load") or {}
        used = full.get("cpu_cores") or {}
        line += _machine_bound(
            s.get("cores"),
            ceiling,
            0.5,
            [
                (
                    "the load tool",
                    _per_unit(load.get("own_cores"), (load.get("rps") or 0) * fanout),
                ),
                ("PostgreSQL", _per_unit(used.get("postgresql"), rate)),
                ("the sink", _per_unit(used.get("sink"), rate)),
                ("the server", spent),
            ],
            unit="delivery",
        )
        if used.get("machine") and s.get("cores"):
            line += (
                f" The machine was {used['machine']:.2f} of its {s.get('cores')} cores busy: "
                "the server waits on PostgreSQL's commits and the sink's answers, and they "
                "on the server, so the run stops short of both bounds."
            )
        lines.append(line)
    profiles = sorted(
        results_dir.glob("profile-*.txt"), key=lambda f: ("-native" not in f.name, f.name)
    )
    if not lines and not profiles:
        return []
    out = [
        "",
        "## Why the missed targets are missed",
        "",
        "A ratio target is a CPU budget: the server is one process on one core, so at the "
        "target each event (or delivery) may cost at most the ceiling's CPU per request ÷ "
        "the ratio. CPU per event is steadier than throughput on a shared host.",
        "",
        *lines,
    ]
    if profiles:
        out += [
            "",
            "Where the CPU goes: py-spy profiles made by `bench/profile.py`, each part's "
            "inclusive share of the samples (the rest is uvicorn, asyncio and the drivers; the "
            "full lists are in the files). Read the `-native` ones first: py-spy pauses the "
            "process to take each of their samples, while the others, read without pausing, "
            "credit much of the time to asyncpg's `Connection._do_execute`; and a coroutine's "
            "samples count under a part only while that coroutine is running, not while a "
            "callback works for it.",
            "",
        ]
        for path in profiles:
            out.append(_profile_line(path))
    return out


# The parts of estafeta a profile is read by: (label, function as py-spy names it).
_PARTS = (
    ("HTTP parsing (uvicorn)", "HttpToolsProtocol.data_received"),
    ("answers (uvicorn)", "RequestResponseCycle.send"),
    ("ingest handler", "IngestApp._handle"),
    ("ingest batch write", "IngestOps.insert_events"),
    ("ingest batch write", "SqlStore.insert_events"),  # before the store's parts were mixins
    ("leases", "LeaseOps.lease"),
    ("leases", "SqlStore.lease"),
    ("attempts", "Attempts._attempt"),
    ("attempts", "Worker._attempt"),  # its name in profiles made before delivery/attempts.py
    ("of which the HTTP client", "HttpConnector.deliver"),
    ("completions", "PostgresStore.complete_batch"),
    ("completions", "PostgresStore.complete"),  # before it said which it dead-lettered
)


def _profile_line(path: Path) -> str:
    """`* profile-x.txt (commit, time; N samples): part 12 %, …` from a profile file."""
    text = path.read_text()
    header, _, rest = text.partition("\npy-spy samples:")
    try:
        facts = json.loads(header)
    except ValueError:
        facts = {}
    functions: dict[str, float] = {}
    for line in rest.partition("-- by function, inclusive % --")[2].strip().splitlines():
        pct, _, frame = line.strip().partition("%")
        functions.setdefault(frame.strip().split(" (")[0], float(pct))
    parts = [f"{label} {functions[name]:.0f} %" for label, name in _PARTS if name in functions]
    made = "; ".join(str(facts[k]) for k in ("commit", "recorded") if facts.get(k))
    samples = rest.split("\n", 1)[0].strip()
    return f"* `{path.name}` ({made + '; ' if made else ''}{samples} samples): " + (
        ", ".join(parts) if parts else "no part named"
    )


def _latency_rows(doc: Doc) -> list[tuple[str, str, dict[str, Any]]]:
    p = doc.get("phases", {})
    out: list[tuple[str, str, dict[str, Any]]] = []
    if "ceiling_http" in p:
        out.append(("bare-HTTP ceiling", "wrk full speed", p["ceiling_http"]["latency_ms"]))
    if "ceiling_starlette" in p:
        latency = p["ceiling_starlette"]["latency_ms"]
        out.append(("trivial Starlette route", "wrk full speed", latency))
    for key, label in (
        ("ingest_postgresql", "ingest, PostgreSQL"),
        ("ingest_sqlite", "ingest, SQLite"),
        ("ingest_baseline", "ingest, FastAPI + Celery"),
    ):
        if key in p:
            full, half = p[key]["full"], p[key]["half"]
            out.append((label, f"wrk full speed ({full['rps']:,.0f}/s)", full["latency_ms"]))
            out.append((label, f"open loop {half['target_rate']:,.0f}/s", half["latency_ms"]))
    for key, label in (
        ("e2e_estafeta_f1", "end to end f1, estafeta"),
        ("e2e_estafeta_f3", "end to end f3, estafeta"),
        ("e2e_baseline_f1", "end to end f1, FastAPI + Celery"),
        ("e2e_baseline_f3", "end to end f3, FastAPI + Celery"),
    ):
        if key in p:
            full, half = p[key]["full"], p[key]["half"]
            out.append((label, "closed loop, arrival − sent", full["latency_ms"]))
            out.append((label, f"open loop {half['rate']:,.0f}/s", half["latency_ms"]))
    return out


def chart(doc: Doc, path: Path) -> None:
    """Two panels: throughput (log scale) and latency percentiles (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = doc.get("phases", {})
    m = doc["meta"]["machine"]
    bars: list[tuple[str, float, str]] = []

    def add(label: str, value: float | None, color: str) -> None:
        if value is not None:
            bars.append((label, float(value), color))

    add("ceiling: bare HTTP", _get(p, "ceiling_http", "rps"), "#999999")
    add("ingest PostgreSQL", _get(p, "ingest_postgresql", "full", "committed_per_s"), "#1f77b4")
    add("ingest SQLite", _get(p, "ingest_sqlite", "full", "committed_per_s"), "#1f77b4")
    add("ingest FastAPI+Celery", _get(p, "ingest_baseline", "full", "committed_per_s"), "#d62728")
    add("ceiling: delivery client", _get(p, "ceiling_client", "rps"), "#999999")
    for f in (1, 3):
        add(
            f"e2e f{f} estafeta (events)",
            _get(p, f"e2e_estafeta_f{f}", "full", "events_per_s"),
            "#2ca02c",
        )
        add(
            f"e2e f{f} baseline (events)",
            _get(p, f"e2e_baseline_f{f}", "full", "events_per_s"),
            "#d62728",
        )
    add("drain, small backlog", _get(p, "backlog", "drain_small", "deliveries_per_s"), "#9467bd")
    add("drain, large backlog", _get(p, "backlog", "drain_large", "deliveries_per_s"), "#9467bd")

    lat = _latency_rows(doc)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 7.5))
    labels = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    ax1.barh(labels, values, color=[b[2] for b in bars][::-1])
    for y, v in enumerate(values):
        ax1.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("per second (log scale)")
    ax1.set_title("Throughput")

    names = [f"{label}\n{load}" for label, load, _ in lat][::-1]
    ys = range(len(names))
    height = 0.27
    for offset, (key, color) in enumerate(
        (("p50", "#2ca02c"), ("p99", "#ff7f0e"), ("p99.9", "#d62728"))
    ):
        vals = [(row[2].get(key) or 0.0) for row in lat][::-1]
        ax2.barh(
            [y + (offset - 1) * height for y in ys], vals, height=height, color=color, label=key
        )
    ax2.set_yticks(list(ys))
    ax2.set_yticklabels(names, fontsize=7)
    ax2.set_xscale("log")
    ax2.axvline(20, color="black", linestyle=":", linewidth=1)
    ax2.text(20, len(names) - 0.5, " 20 ms target (ingest p99 at 50 %)", fontsize=7)
    ax2.set_xlabel("milliseconds (log scale)")
    ax2.set_title("Latency")
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"estafeta benchmark — {m['cpu_count']} cores ({m['cpu_model']}), PostgreSQL "
        f"{m['postgresql']}, SQLite {m['sqlite']}, commit {m['git_commit'][:10]}"
        + (" (quick)" if doc["meta"]["settings"]["quick"] else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: Doc, md_path: Path, png_path: Path) -> None:
    md_path.write_text(markdown(doc, md_path.parent))
    chart(doc, png_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    doc = json.loads(args.results.read_text())
    doc["summary"] = summarize(doc)
    args.results.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write(doc, args.results.with_suffix(".md"), args.results.with_suffix(".png"))


if __name__ == "__main__":
    main()
