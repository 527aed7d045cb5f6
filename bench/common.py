"""What every phase of the benchmark shares: processes pinned to a core, ports, payloads,
estafeta configurations, databases, the sink's counters and the machine's facts."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
PYTHON = sys.executable
BIN = Path(PYTHON).parent
HOST = "127.0.0.1"

# CPU placement on a 2-core machine: the system under test on one core, the load tool (and the
# sink, which stands for the outside world) on the other. PostgreSQL and Redis are shared
# system services and float over both cores.
SERVER_CPU = 0
LOAD_CPU = 1 if (os.cpu_count() or 1) > 1 else 0

PG_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# A dedicated database number on the shared Redis, and a key prefix inside it.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
REDIS_PREFIX = "estafeta-bench:"

APP_SECRET = "bench-app-secret-5f1c0a7e"  # noqa: S105 - a benchmark-only secret
VERIFY_TOKEN = "bench-verify-token"  # noqa: S105 - benchmark-only
# Outbound Standard Webhooks secret: estafeta signs every delivery, as in production.
OUT_SECRET = "whsec_" + base64.b64encode(b"estafeta-bench-outbound-secret!!").decode()
DB_PREFIX = "estafeta_bench_"

SENT_MARK = b"[sent:"
SENT_RE = re.compile(rb"\[sent:(\d+)\]")


# -- payloads ----------------------------------------------------------------------------------

_TEXT = (
    "Olá! Gostaria de agendar uma consulta para amanhã de manhã, de preferência antes das dez. "
    "Minha mãe também precisa de retorno com a doutora Ana na próxima semana, se houver "
    "horário. Obrigada!"
)


def wamid(run: str, i: int) -> str:
    """A distinct, WAMID-shaped message id (`wamid.` + base64), per run and index."""
    raw = f"5511{i % 10**8:08d}{run}{i:012d}".encode()
    return "wamid." + base64.b64encode(raw).decode()


def whatsapp_body(run: str, i: int, sent_ns: int = 0) -> bytes:
    """One WhatsApp Cloud text-message webhook (the shape of
    tests/fixtures/whatsapp_cloud/text.json), about 0.7 KB, with the send time in the text."""
    phone = f"5511{9_0000_0000 + (i * 7919) % 1_0000_0000:09d}"
    doc = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "108372914455201",
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "551140028922",
                                "phone_number_id": "114950281736452",
                            },
                            "contacts": [{"profile": {"name": "Maria Silva"}, "wa_id": phone}],
                            "messages": [
                                {
                                    "from": phone,
                                    "id": wamid(run, i),
                                    "timestamp": str(1_751_371_200 + i // 1000),
                                    "type": "text",
                                    "text": {"body": f"{_TEXT} [sent:{sent_ns:019d}]"},
                                }
                            ],
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def canonical_event(run: str, i: int) -> bytes:
    """The canonical event (DESIGN §3.4) estafeta makes of `whatsapp_body(run, i)`, as sent."""
    phone = f"5511{9_0000_0000 + (i * 7919) % 1_0000_0000:09d}"
    event = {
        "id": f"evt_01JD{i:022d}",
        "type": "message.received",
        "tenant": "bench",
        "source": "wa",
        "occurred_at": "2026-11-21T13:05:00.000Z",
        "received_at": "2026-11-21T13:05:00.123Z",
        "data": {
            "channel": "whatsapp",
            "provider": "whatsapp_cloud",
            "message_id": wamid(run, i),
            "conversation_id": phone,
            "from": "+" + phone,
            "to": "+551140028922",
            "phone_number_id": "114950281736452",
            "waba_id": "108372914455201",
            "contact_name": "Maria Silva",
            "kind": "text",
            "text": f"{_TEXT} [sent:{0:019d}]",
        },
    }
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def signature(body: bytes, secret: str = APP_SECRET) -> str:
    """`X-Hub-Signature-256`: `sha256=` + hex HMAC-SHA256(app secret, raw body)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def stamp(body: bytes, sent_ns: int) -> bytes:
    """The body with its `[sent:…]` mark set to `sent_ns` (same length, so re-sign it)."""
    return SENT_RE.sub(b"[sent:%019d]" % sent_ns, body, count=1)


def write_requests(path: Path, run: str, count: int) -> Path:
    """`count` pre-signed requests, one `signature body` line each, for wrk's Lua script."""
    with path.open("wb") as out:
        for i in range(count):
            body = whatsapp_body(run, i)
            out.write(signature(body).encode() + b" " + body + b"\n")
    return path


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout_s} s")


@dataclass
class Proc:
    """A child process started with `start`, pinned to one core; stop it with `stop`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    cpu: int | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL (this process only) if it does not stop in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return int(self.popen.returncode)

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start(
    name: str,
    cmd: Sequence[str],
    *,
    cpu: int | None,
    logdir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start `cmd` (under `taskset -c cpu` when a core is given), output to a log file."""
    full = ["taskset", "-c", str(cpu), *cmd] if cpu is not None else list(cmd)
    log = logdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            full,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=str(cwd or REPO),
        )
    return Proc(name, popen, log, cpu)


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process in `procs` (last started first) on the way out."""
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def run_json(cmd: Sequence[str], *, cpu: int | None, timeout_s: float) -> dict[str, Any]:
    """Run a bench tool pinned to a core and parse the last `BENCH_JSON {...}` line it prints."""
    full = ["taskset", "-c", str(cpu), *cmd] if cpu is not None else list(cmd)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    done = subprocess.run(full, capture_output=True, timeout=timeout_s, cwd=str(REPO), check=False)
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout.decode(errors="replace")
    for line in reversed(out.splitlines()):
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            # The tool's own CPU (it was the only child to end meanwhile): a load tool near
            # 1.0 core would be the bottleneck, not the server.
            used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            result["tool_cpu_s"] = round(used, 2)
            result["tool_cores"] = round(used / wall, 3) if wall else None
            return result
    raise RuntimeError(
        f"{cmd[0]} printed no result (exit {done.returncode}):\n{out[-2000:]}\n"
        f"{done.stderr.decode(errors='replace')[-2000:]}"
    )


def emit(result: dict[str, Any]) -> None:
    """How bench tools hand their result to the orchestrator."""
    print("BENCH_JSON " + json.dumps(result), flush=True)


def sample_rss(pid: int) -> int:
    """Resident set size of a process and its children, in bytes (0 once it is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = int(proc.memory_info().rss)
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += int(child.memory_info().rss)
        return total
    except psutil.Error:
        return 0


# -- estafeta ----------------------------------------------------------------------------------


def estafeta_config(
    path: Path,
    *,
    port: int,
    db_url: str,
    sink_url: str,
    fanout: int = 1,
    spool_dir: Path,
    worker: dict[str, Any] | None = None,
) -> Path:
    """A configuration: one tenant without a practical rate limit, one WhatsApp Cloud source,
    `fanout` signed HTTP destinations on the sink, one route `message.*` to all of them."""
    destinations = "\n".join(
        f"""
[[destinations]]
id = "sink{n}"
tenant = "bench"
kind = "http"
url = "{sink_url}/hooks/sink{n}"
secret = "{OUT_SECRET}"
timeout_s = 10
max_attempts = 8
"""
        for n in range(1, fanout + 1)
    )
    names = ", ".join(f'"sink{n}"' for n in range(1, fanout + 1))
    worker_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (worker or {}).items())
    path.write_text(
        f"""# Generated by bench/ for one phase of the benchmark.
[server]
listen = "{HOST}:{port}"

[storage]
url = "{db_url}"
spool_dir = "{spool_dir}"

[worker]
{worker_lines}

[[tenants]]
id = "bench"
name = "Benchmark"
ingress_rate_limit = "100000000/second"

[[sources]]
id = "wa"
tenant = "bench"
kind = "whatsapp_cloud"
app_secret = "{APP_SECRET}"
verify_token = "{VERIFY_TOKEN}"
{destinations}
[[routes]]
tenant = "bench"
events = ["message.*"]
destinations = [{names}]
priority = 1
"""
    )
    return path


def estafeta_cmd(*args: str) -> list[str]:
    return [str(BIN / "estafeta"), "--log-level", "warning", *args]


def post_signed(port: int, path: str, body: bytes) -> int:
    """POST one signed webhook; the HTTP status."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=body,
        headers={"content-type": "application/json", "x-hub-signature-256": signature(body)},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# -- databases ---------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, str, str]:
    """(everything before the database, the database, `?query` or "") of a PostgreSQL URL;
    the query may name a Unix-socket directory (`?host=/var/run/postgresql`)."""
    rest, mark, query = url.partition("?")
    base, _, database = rest.rpartition("/")
    return base, database, mark + query


def database_of(url: str) -> str:
    return _split_url(url)[1]


def pg_url(database: str) -> str:
    base, _, query = _split_url(PG_ADMIN_URL)
    return f"{base}/{database}{query}"


def pg_connect(database: str | None = None) -> Any:
    import psycopg2

    conn = psycopg2.connect(pg_url(database) if database else PG_ADMIN_URL)
    conn.autocommit = True
    return conn


def pg_fresh(name: str) -> str:
    """Create the bench-owned database `estafeta_bench_<name>_<pid>`; its URL.

    Named by this process, so that two runs at once (two `bench/instructions.py`) do not drop
    each other's database mid-run, which left both hanging. Those a killed run left behind
    (its process gone) are dropped here."""
    database = f"{DB_PREFIX}{name}_{os.getpid()}"
    conn = pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s",
                (f"{DB_PREFIX}{name}_%",),
            )
            for (found,) in cur.fetchall():
                pid = found.rsplit("_", 1)[-1]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    cur.execute(f'DROP DATABASE IF EXISTS "{found}" WITH (FORCE)')
            cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{database}"')
    finally:
        conn.close()
    return pg_url(database)


def pg_drop(database_url: str) -> None:
    database = database_of(database_url)
    if not database.startswith(DB_PREFIX):
        raise ValueError(f"refusing to drop {database!r}: not a bench database")
    conn = pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        conn.close()


def pg_scalar(database_url: str, query: str) -> Any:
    conn = pg_connect(database_of(database_url))
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def sqlite_scalar(path: Path, query: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(query).fetchone()
        return row[0] if row else None
    finally:
        conn.close()


# -- the sink ----------------------------------------------------------------------------------


def sink_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/_bench/stats", timeout=10) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


def sink_reset(port: int) -> None:
    request = urllib.request.Request(f"http://{HOST}:{port}/_bench/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310
        pass


def start_sink(logdir: Path, *, cpu: int | None = LOAD_CPU) -> tuple[Proc, int, str]:
    port = free_port()
    proc = start(
        "sink", [PYTHON, str(BENCH_DIR / "sink.py"), "--port", str(port)], cpu=cpu, logdir=logdir
    )
    wait_port(port, proc=proc.popen)
    return proc, port, f"http://{HOST}:{port}"


def wait_sink(
    port: int, expected: int, *, timeout_s: float, settle_s: float = 3.0
) -> dict[str, Any]:
    """Wait until the sink holds `expected` distinct deliveries, or nothing arrived for
    `settle_s`, or `timeout_s` passed; the sink's final stats."""
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    while True:
        stats = sink_stats(port)
        now = time.monotonic()
        if stats["unique"] >= expected or now > deadline:
            return stats
        if stats["count"] != last_count:
            last_count, last_change = stats["count"], now
        elif now - last_change > settle_s:
            return stats
        time.sleep(0.2)


# -- numbers -----------------------------------------------------------------------------------


def percentiles(
    values: Sequence[float], points: Sequence[float] = (50, 99, 99.9)
) -> dict[str, float]:
    """Nearest-rank percentiles, keyed `p50`, `p99`, `p99.9`."""
    if not values:
        return {f"p{p:g}": float("nan") for p in points}
    ordered = sorted(values)
    out = {}
    for p in points:
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        out[f"p{p:g}"] = float(ordered[rank])
    return out


def per_event(cores: dict[str, float], key: str, rate: float) -> float | None:
    """CPU microseconds the `key` process spent per request or event: a figure that other
    load on the machine does not distort the way throughput is distorted."""
    return round(cores.get(key, 0.0) * 1e6 / rate, 1) if rate else None


# -- the machine -------------------------------------------------------------------------------


@dataclass
class Machine:
    """Facts every figure is reported with."""

    cpu_count: int
    cpu_model: str
    python: str
    postgresql: str
    sqlite: str
    redis: str
    wrk: str
    git_commit: str
    git_dirty: bool
    os: str
    placement: dict[str, str] = field(default_factory=dict)


def machine() -> Machine:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        postgres = str(pg_scalar(PG_ADMIN_URL, "SHOW server_version"))
    except Exception as exc:  # reported, not fatal here: the PostgreSQL phases will say
        postgres = f"unreachable ({type(exc).__name__})"
    redis_version = "unknown"
    with contextlib.suppress(Exception):
        import redis

        redis_version = str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])
    wrk = shutil.which("wrk")
    wrk_version = "missing"
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, check=False).stdout.decode()
        wrk_version = out.splitlines()[0].strip() if out else "unknown"

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, cwd=REPO, check=False)
        return done.stdout.decode().strip()

    return Machine(
        cpu_count=os.cpu_count() or 1,
        cpu_model=model,
        python=platform.python_version(),
        postgresql=postgres,
        sqlite=sqlite3.sqlite_version,
        redis=redis_version,
        wrk=wrk_version,
        git_commit=git("rev-parse", "HEAD") or "unknown",
        # Results are outputs, not the code measured: a run's own files do not make it dirty.
        git_dirty=bool(
            git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
        ),
        os=platform.platform(),
        placement={
            "server": f"core {SERVER_CPU} (taskset)",
            "load tool and sink": f"core {LOAD_CPU} (taskset)",
            "postgresql, redis": "unpinned (shared system services)",
        },
    )


class CpuMeter:
    """CPU time used during a window by given processes (with their children), by all
    PostgreSQL and Redis server processes, and by everything else on the machine (other
    people's work on a shared machine), in cores (CPU seconds per wall second)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start = self._snapshot()
        self._t0 = time.monotonic()

    def _snapshot(self) -> dict[str, float]:
        import psutil

        ours: dict[int, str] = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                ours[pid] = name
                for child in proc.children(recursive=True):
                    ours[child.pid] = name
        totals: dict[str, float] = {}
        me = os.getpid()
        for proc in psutil.process_iter(["name", "cpu_times", "username"]):
            times = proc.info["cpu_times"]
            if times is None:
                continue
            used = float(times.user + times.system)
            name = proc.info["name"] or ""
            if proc.pid in ours:
                key = ours[proc.pid]
            elif proc.info["username"] == "postgres" or name.startswith("postgres"):
                key = "postgresql"
            elif name.startswith("redis"):
                key = "redis"
            elif proc.pid == me:
                key = "orchestrator"
            else:
                key = "other"
            totals[key] = totals.get(key, 0.0) + used
        total = psutil.cpu_times()
        totals["machine"] = float(sum(total) - total.idle - getattr(total, "iowait", 0.0))
        return totals

    def cores(self) -> dict[str, float]:
        """Cores used by each group since the meter was made (processes that ended within
        the window are not counted)."""
        end = self._snapshot()
        wall = time.monotonic() - self._t0
        return {
            k: round(max(0.0, end.get(k, 0.0) - self._start.get(k, 0.0)) / wall, 3)
            for k in sorted(set(end) | set(self._start))
            if wall > 0
        }


def wait_quiet(
    *, threshold: float = 0.3, io_threshold: float = 0.05, max_wait_s: float = 45.0
) -> dict[str, float]:
    """Before a phase: wait (bounded) until the machine's background load, measured over one
    second while nothing of ours runs, is under `threshold` cores, and the share of that
    second in which some task waited for the disk (Linux's I/O pressure) under
    `io_threshold`. Other people's builds and tests on a shared machine would otherwise be
    measured as estafeta's slowness, and so would the writeback an earlier phase left (after
    a heavy phase this disk stayed busy for tens of seconds: Linux's I/O pressure at 38 % of
    the time, falling to 12 % within 15 s). Returns what was seen: the background in cores,
    the I/O stall share and how long it waited."""
    import psutil

    began = time.monotonic()
    while True:
        stalled_before = _io_stalled_us()
        busy = psutil.cpu_percent(interval=1.0) / 100 * (os.cpu_count() or 1)
        stalled_after = _io_stalled_us()
        io_stalled = (
            (stalled_after - stalled_before) / 1e6
            if stalled_before is not None and stalled_after is not None
            else 0.0
        )
        waited = time.monotonic() - began
        if (busy < threshold and io_stalled < io_threshold) or waited >= max_wait_s:
            return {
                "background_cores": round(busy, 2),
                "io_stalled": round(io_stalled, 3),
                "waited_s": round(waited, 1),
            }
        time.sleep(2.0)


def _io_stalled_us() -> int | None:
    """Microseconds, since boot, in which some task waited for I/O (/proc/pressure/io)."""
    try:
        first = Path("/proc/pressure/io").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    total = first.rsplit("total=", 1)[-1]
    return int(total) if total.isdigit() else None
