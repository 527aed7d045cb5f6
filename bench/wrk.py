"""Run wrk with bench/requests.lua (pre-signed requests) and read its JSON summary."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from common import BENCH_DIR, HOST, LOAD_CPU, run_json

LUA = BENCH_DIR / "requests.lua"


def wrk(
    port: int,
    path: str,
    requests_file: Path,
    *,
    seconds: float,
    connections: int = 64,
    threads: int = 1,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Closed-loop full speed for `seconds`: requests/s (2xx/3xx), latency percentiles in
    ms, error counts. wrk runs pinned to the load core."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk")
    cmd = [
        exe,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(LUA),
        f"http://{HOST}:{port}{path}",
        "--",
        str(requests_file),
        path,
        str(threads),
    ]
    raw = run_json(cmd, cpu=LOAD_CPU, timeout_s=seconds + 120)
    duration_s = raw["duration_us"] / 1e6
    errors = raw["errors"]
    ok = raw["requests"] - errors["status"]
    lat = raw["latency_us"]
    used = raw.get("tool_cpu_s")
    return {
        # wrk's CPU over the load (an upper bound: its Lua init is included).
        "own_cores": round(used / duration_s, 3) if used is not None and duration_s else None,
        "tool": f"wrk -t{threads} -c{connections} -d{max(1, round(seconds))}s"
        " (Lua: a pre-built table of signed requests)",
        "connections": connections,
        "duration_s": duration_s,
        "requests": raw["requests"],
        "ok": ok,
        "rps": ok / duration_s if duration_s else 0.0,
        "errors": errors,
        "wraps": raw["wraps"],
        "latency_ms": {k: lat[k] / 1000 for k in ("p50", "p90", "p99", "p99.9", "mean", "max")},
    }
