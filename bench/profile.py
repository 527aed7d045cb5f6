"""Profile estafeta's ingest path with py-spy while it is under load, to explain a miss.

    python bench/profile.py [--engine postgresql|sqlite] [--rate R | --full] [--seconds S]
                            [--fanout N] [--workers] [--native]
    python bench/profile.py --worker [--backlog N] [--seconds S] [--native]

starts `estafeta serve` (on the server core, `--no-workers` unless `--workers`) on a fresh
database, loads it with `loadgen.py` (open loop at `--rate`, or closed loop with `--full`),
and meanwhile records the server with `py-spy record --nonblocking --gil` (on the load
core; `--native` adds C frames, which shows system calls and extension code). It writes
`bench/results/profile-<name>.txt`: the load's result, the server's CPU, the number of
PostgreSQL commits per accepted event (how well group commit batches), and the functions
with the largest inclusive and self sample shares; the raw samples go to
`bench/results/logs/`. With `--worker` it profiles `estafeta worker` draining a PostgreSQL
backlog instead (deliveries per commit instead of events per commit).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    BIN,
    LOAD_CPU,
    RESULTS,
    SERVER_CPU,
    CpuMeter,
    estafeta_cmd,
    estafeta_config,
    free_port,
    machine,
    pg_drop,
    pg_fresh,
    pg_scalar,
    post_signed,
    running,
    sink_stats,
    start,
    start_sink,
    wait_port,
    whatsapp_body,
)
from e2e import closed_loop
from ingest import open_loop

_COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


def aggregate(raw: Path, top: int = 40) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks → inclusive and self shares per function."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        # The same function at any line: "where the CPU goes" by part, in bench/report.py.
        for function in {FRAME_LINE.sub(")", frame) for frame in frames}:
            functions[function] += n
        own[frames[-1]] += n

    def share(counter: collections.Counter[str], most: int = top) -> list[tuple[float, str]]:
        return [(round(100 * n / total, 1), f) for f, n in counter.most_common(most)]

    return {
        "samples": total,
        "inclusive": share(inclusive),
        "self": share(own),
        "functions": share(functions, 150),
    }


FRAME_LINE = re.compile(r":\d+\)$")  # "f (path.py:12)" → "f (path.py)"


NATIVE = False  # --native: C frames too (system calls, extension modules), not only Python


def _spy(pid: int, seconds: float, raw: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "taskset",
            "-c",
            str(LOAD_CPU),
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--rate",
            "250",
            # With --native py-spy must pause the process to unwind C stacks.
            "--native" if NATIVE else "--nonblocking",
            # Only the thread holding the GIL: where the Python CPU goes (a thread waiting on
            # a queue or inside SQLite's C code with the GIL released is not counted).
            "--gil",
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_worker(args: argparse.Namespace) -> dict[str, Any]:
    """`estafeta worker` draining a PostgreSQL backlog of `--backlog` pending deliveries."""
    from backlog import insert_pending

    workdir = Path(tempfile.mkdtemp(prefix="estafeta-profile-"))
    logdir = RESULTS / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    name = args.name or "worker"
    raw = logdir / f"profile-{name}.raw"
    db_url = pg_fresh("profile")
    sink, sink_port, sink_url = start_sink(logdir)
    config = estafeta_config(
        workdir / "profile.toml",
        port=free_port(),
        db_url=db_url,
        sink_url=sink_url,
        spool_dir=workdir / "spool",
    )
    result: dict[str, Any] = {"name": name, "engine": "postgresql", "backlog": args.backlog}
    try:
        with running([sink]):
            migrate = start(
                "profile-migrate",
                estafeta_cmd("migrate", "--config", str(config)),
                cpu=SERVER_CPU,
                logdir=logdir,
            )
            migrate.popen.wait(120)
            insert_pending(db_url, 1, args.backlog)
            worker = start(
                f"profile-worker-{name}",
                estafeta_cmd("worker", "--config", str(config)),
                cpu=SERVER_CPU,
                logdir=logdir,
            )
            with running([worker]):
                deadline = time.monotonic() + 60
                while sink_stats(sink_port)["count"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
                commits = int(pg_scalar(db_url, _COMMITS))
                first = sink_stats(sink_port)["count"]
                meter = CpuMeter({"worker": worker.pid})
                spy = _spy(worker.pid, args.seconds, raw)
                spy.wait(args.seconds + 60)
                cores = meter.cores()
                delivered = sink_stats(sink_port)["count"] - first
                made = int(pg_scalar(db_url, _COMMITS)) - commits
            result["cpu_cores"] = cores
            result["deliveries"] = delivered
            result["deliveries_per_commit"] = round(delivered / made, 2) if made else None
    finally:
        pg_drop(db_url)
        shutil.rmtree(workdir, ignore_errors=True)
    result["profile"] = aggregate(raw) if raw.exists() else {"error": "py-spy wrote nothing"}
    return result


def profile(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="estafeta-profile-"))
    logdir = RESULTS / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    name = args.name or (
        f"{'e2e' if args.workers else 'ingest'}-{args.engine}"
        f"-{'full' if args.full else int(args.rate)}{'-native' if NATIVE else ''}"
    )
    raw = logdir / f"profile-{name}.raw"
    db_url = pg_fresh("profile") if args.engine == "postgresql" else f"sqlite:///{workdir}/p.db"
    sink, _sink_port, sink_url = start_sink(logdir)
    port = free_port()
    config = estafeta_config(
        workdir / "profile.toml",
        port=port,
        db_url=db_url,
        sink_url=sink_url,
        fanout=args.fanout,
        spool_dir=workdir / "spool",
    )
    serve_args = ["serve", "--config", str(config)]
    if not args.workers:
        serve_args.append("--no-workers")
    server = start(
        f"profile-serve-{name}", estafeta_cmd(*serve_args), cpu=SERVER_CPU, logdir=logdir
    )
    result: dict[str, Any] = {"name": name, "engine": args.engine, "workers": args.workers}
    try:
        with running([sink, server]):
            wait_port(port, timeout_s=60, proc=server.popen)
            post_signed(port, "/in/wa", whatsapp_body("warm", 0))
            commits = pg_scalar(db_url, _COMMITS) if args.engine == "postgresql" else None
            spy = _spy(server.pid, args.seconds - 2, raw)
            time.sleep(1.0)  # py-spy attaches
            meter = CpuMeter({"server": server.pid})
            tag = f"profile-{int(time.time())}"
            if args.full:
                load = closed_loop(
                    port,
                    path="/in/wa",
                    run=tag,
                    seconds=args.seconds,
                    count=8000 * int(args.seconds),
                )
            else:
                load = open_loop(port, run=tag, rate=args.rate, seconds=args.seconds)
            result["cpu_cores"] = meter.cores()
            spy.wait(60)
            if commits is not None:
                made = int(pg_scalar(db_url, _COMMITS)) - int(commits)
                result["pg_commits"] = made
                result["events_per_commit"] = round(load["ok"] / made, 2) if made else None
            result["load"] = {k: load[k] for k in ("tool", "rps", "ok", "latency_ms")}
    finally:
        if args.engine == "postgresql":
            pg_drop(db_url)
        shutil.rmtree(workdir, ignore_errors=True)
    result["profile"] = aggregate(raw) if raw.exists() else {"error": "py-spy wrote nothing"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--rate", type=float, default=850.0)
    parser.add_argument("--full", action="store_true", help="closed loop instead of --rate")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--fanout", type=int, default=1)
    parser.add_argument("--workers", action="store_true", help="run the in-process worker")
    parser.add_argument("--name", default=None)
    parser.add_argument("--worker", action="store_true", help="profile `estafeta worker` instead")
    parser.add_argument("--backlog", type=int, default=200_000, help="with --worker")
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy)")
    args = parser.parse_args()
    global NATIVE
    NATIVE = args.native
    result = profile_worker(args) if args.worker else profile(args)
    facts = machine()
    result["commit"] = facts.git_commit[:12] + (" + uncommitted" if facts.git_dirty else "")
    result["recorded"] = datetime.now(UTC).isoformat(timespec="seconds")
    out = RESULTS / f"profile-{result['name']}.txt"
    lines = [json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1)]
    prof = result["profile"]
    lines.append(f"\npy-spy samples: {prof.get('samples')}\n\n-- inclusive % --")
    lines += [f"{pct:5.1f}%  {frame}" for pct, frame in prof.get("inclusive", [])]
    lines.append("\n-- self % --")
    lines += [f"{pct:5.1f}%  {frame}" for pct, frame in prof.get("self", [])]
    lines.append("\n-- by function, inclusive % --")
    lines += [f"{pct:5.1f}%  {frame}" for pct, frame in prof.get("functions", [])]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
