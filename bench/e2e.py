"""Phase 3, end to end: signed webhooks in, deliveries out to the sink, fan-out 1 and 3.

`estafeta serve` (HTTP, the in-process delivery worker, PostgreSQL) runs on the server core;
the load generator and the sink share the load core. Each webhook carries its send time
(`[sent:<ns>]`, stamped and signed by `loadgen.py` as it is written) and the sink computes
arrival − sent for every delivery.

1. **full speed**: closed loop, 32 connections, for a fixed time; then the load stops and
   the pipeline drains. Delivered/s = distinct deliveries / (last arrival − first send):
   the system is charged for the backlog it built up, not only for what it took in.
2. **50 %**: open loop at half the delivered event rate; p50/p99 of ingest → arrival.

The same measurement serves the FastAPI + Celery baseline (`baseline/`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    LOAD_CPU,
    PYTHON,
    SERVER_CPU,
    CpuMeter,
    Proc,
    estafeta_cmd,
    estafeta_config,
    free_port,
    per_event,
    pg_drop,
    pg_fresh,
    post_signed,
    run_json,
    running,
    sink_reset,
    sink_stats,
    start,
    start_sink,
    wait_port,
    wait_sink,
    whatsapp_body,
)
from ingest import open_loop

# A system under test: given the sink's URL and the fan-out, yields (its processes, the
# port and the path webhooks go to) while it runs.
System = Callable[[str, int, Path], Any]


def closed_loop(
    port: int, *, path: str, run: str, seconds: float, count: int, connections: int = 32
) -> dict[str, Any]:
    cmd = [
        PYTHON,
        str(BENCH_DIR / "loadgen.py"),
        "--port",
        str(port),
        "--path",
        path,
        "--run",
        run,
        "--count",
        str(count),
        "--seconds",
        str(seconds),
        "--connections",
        str(connections),
        "--stamp",
    ]
    return run_json(cmd, cpu=LOAD_CPU, timeout_s=seconds + 120)


def _window(stats: dict[str, Any], started_ns: int, fanout: int) -> dict[str, Any]:
    unique = int(stats["unique"])
    elapsed = max(1e-9, (stats["last_ns"] - started_ns) / 1e9)
    return {
        "deliveries": unique,
        "duplicates": stats["duplicates"],
        "elapsed_s": elapsed,
        "deliveries_per_s": unique / elapsed,
        "events_per_s": unique / fanout / elapsed,
        "latency_ms": stats["latency_ms"],
    }


def measure(
    port: int,
    path: str,
    sink_port: int,
    *,
    fanout: int,
    seconds: float,
    tag: str,
    pids: dict[str, int],
    drain_timeout_s: float,
    count_hint: int,
) -> dict[str, Any]:
    """Full speed then 50 % through a running system; see the module docstring."""
    warm = post_signed(port, path, whatsapp_body(f"{tag}-warm", 0))
    if warm not in (200, 202):
        raise RuntimeError(f"a signed webhook was answered {warm}")
    wait_sink(sink_port, fanout, timeout_s=30)
    sink_reset(sink_port)

    meter = CpuMeter(pids)
    load = closed_loop(port, path=path, run=f"{tag}-full", seconds=seconds, count=count_hint)
    at_stop = sink_stats(sink_port)
    expected = load["ok"] * fanout
    stats = wait_sink(sink_port, expected, timeout_s=drain_timeout_s, settle_s=10)
    full = {
        "load": load,
        "accepted": load["ok"],
        "expected_deliveries": expected,
        "backlog_when_load_stopped": expected - at_stop["unique"],
        "drained": stats["unique"] >= expected,
        "cpu_cores": meter.cores(),
        **_window(stats, load["started_unix_ns"], fanout),
    }

    sink_reset(sink_port)
    rate = max(1.0, full["events_per_s"] / 2)
    meter = CpuMeter(pids)
    half_load = open_loop(
        port, run=f"{tag}-half", rate=rate, seconds=seconds, path=path, stamp=True
    )
    expected = half_load["ok"] * fanout
    stats = wait_sink(sink_port, expected, timeout_s=drain_timeout_s, settle_s=10)
    half = {
        "load": half_load,
        "rate": rate,
        "expected_deliveries": expected,
        "drained": stats["unique"] >= expected,
        "cpu_cores": meter.cores(),
        **_window(stats, half_load["started_unix_ns"], fanout),
    }
    system_cores = sum(v for k, v in half["cpu_cores"].items() if k in pids and k != "sink")
    half["system_cpu_us_per_event"] = per_event({"system": system_cores}, "system", rate)
    return {"fanout": fanout, "full": full, "half": half}


@contextmanager
def estafeta_system(
    sink_url: str, fanout: int, workdir: Path, logdir: Path
) -> Iterator[tuple[list[Proc], int, str]]:
    """`estafeta serve` with its in-process worker on a fresh PostgreSQL database."""
    db_url = pg_fresh("e2e")
    port = free_port()
    config = estafeta_config(
        workdir / f"e2e-f{fanout}.toml",
        port=port,
        db_url=db_url,
        sink_url=sink_url,
        fanout=fanout,
        spool_dir=workdir / f"spool-e2e-{fanout}",
    )
    server = start(
        f"estafeta-serve-e2e-f{fanout}",
        estafeta_cmd("serve", "--config", str(config)),
        cpu=SERVER_CPU,
        logdir=logdir,
    )
    try:
        with running([server]):
            wait_port(port, timeout_s=60, proc=server.popen)
            yield [server], port, "/in/wa"
    finally:
        pg_drop(db_url)


def e2e(
    system: Callable[..., Any],
    name: str,
    *,
    fanout: int,
    seconds: float,
    workdir: Path,
    logdir: Path,
    drain_timeout_s: float = 120,
) -> dict[str, Any]:
    """One system, one fan-out: a fresh sink, the system, `measure`."""
    sink, sink_port, sink_url = start_sink(logdir)
    with running([sink]), system(sink_url, fanout, workdir, logdir) as (procs, port, path):
        pids = {p.name: p.pid for p in procs} | {"sink": sink.pid}
        began = time.monotonic()
        result = measure(
            port,
            path,
            sink_port,
            fanout=fanout,
            seconds=seconds,
            tag=f"{name}-f{fanout}-{int(time.time())}",
            pids=pids,
            drain_timeout_s=drain_timeout_s,
            count_hint=int(8000 * seconds),
        )
        result["wall_s"] = time.monotonic() - began
    result["system"] = name
    return result
