"""`estafeta demo`, the first thing a new user runs, tells the whole story and exits 0."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_runs_the_whole_story(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "estafeta", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "subscription handshake: challenge echoed" in out
    assert "1 redelivered webhook answered as a duplicate" in out
    assert "queued → sent → delivered → read" in out
    assert "wait in the dead-letter queue" in out
    assert "0 dead, 0 pending" in out
    assert (tmp_path / "estafeta.toml").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_demo_stopped_midway_says_so_in_one_line(tmp_path: Path, sig: signal.Signals) -> None:
    # Before: the story went on posting to the stopped hub and ended in aiohttp's traceback.
    running = subprocess.Popen(
        [sys.executable, "-u", "-m", "estafeta", "demo", f"--dir={tmp_path}", "--events=1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert running.stdout is not None
    for line in running.stdout:  # the story has begun: webhooks go out from here on
        if "subscription handshake" in line:
            break
    running.send_signal(sig)
    out, err = running.communicate(timeout=60)
    assert running.returncode == 1, out + err
    assert f"demo interrupted: the hub stopped; its database is kept at {tmp_path}" in out
    assert "Traceback" not in err, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("stdout", "status"), [("gone", 0), ("/dev/full", 2)])
def test_a_demo_whose_output_cannot_be_written_ends_in_one_line_at_most(
    tmp_path: Path, stdout: str, status: int
) -> None:
    # `estafeta demo | head -1`. Before: print's BrokenPipeError (or a full disk's OSError)
    # ended the story with the hub still serving, in a cascade of tracebacks.
    command = [sys.executable, "-m", "estafeta", "demo", f"--dir={tmp_path}", "--events=1"]
    if stdout == "gone":
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, timeout=110)
        finally:
            os.close(write_end)
    else:
        with open(stdout, "w") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, timeout=110)
    err = done.stderr.decode()
    assert done.returncode == status, err
    said = "" if status == 0 else "error: cannot write to stdout (No space left on device)\n"
    assert err == said


def demo(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 110, umask: int = -1
) -> subprocess.CompletedProcess[str]:
    """`estafeta demo ARGS`; `umask` the process's (-1: this one's)."""
    return subprocess.run(
        [sys.executable, "-m", "estafeta", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env,
        umask=umask,
    )


@pytest.mark.timeout(120)
def test_the_demo_never_takes_over_a_directory_holding_an_installation(tmp_path: Path) -> None:
    # Before: it overwrote estafeta.toml and wrote its tenant and events into estafeta.db;
    # run twice with one --dir, its second story found every webhook a duplicate and failed.
    config = tmp_path / "estafeta.toml"
    config.write_text('[storage]\nurl = "sqlite:///./estafeta.db"\n')
    done = demo("--dir", str(tmp_path), "--events", "4")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{tmp_path} already holds estafeta.toml" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert config.read_text() == '[storage]\nurl = "sqlite:///./estafeta.db"\n'
    assert not (tmp_path / "estafeta.db").exists()


@pytest.mark.timeout(120)
def test_the_demo_directory_and_its_config_are_readable_by_their_owner_only(
    tmp_path: Path,
) -> None:
    # Before: under the usual umask 022, `--dir` was made 0755 and its estafeta.toml 0644,
    # so every user of the machine could read the admin key that `serve --config` (as the
    # demo prints it) takes, and list the demo's directory.
    workdir = tmp_path / "demo"
    done = demo("--dir", str(workdir), "--events", "2", umask=0o022)
    assert done.returncode == 0, done.stdout + done.stderr
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (workdir, *workdir.iterdir())}
    assert modes == {"demo": "0o700", "estafeta.toml": "0o600", "estafeta.db": "0o600"}


@pytest.mark.parametrize("where", ["a-file", "a-file/below"])
def test_a_demo_directory_that_cannot_be_one_is_a_usage_error(tmp_path: Path, where: str) -> None:
    # Before: FileExistsError / NotADirectoryError tracebacks.
    (tmp_path / "a-file").write_text("")
    done = demo("--dir", str(tmp_path / where))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Invalid value for '--dir'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chosen_by", ["--listen", "ESTAFETA_LISTEN"])
def test_the_demo_on_an_address_in_use_says_so_in_one_line(tmp_path: Path, chosen_by: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESTAFETA_")}
    with socket.create_server(("127.0.0.1", 0)) as taken:  # another program holds the port
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        if chosen_by == "--listen":
            done = demo("--dir", str(tmp_path), "--listen", where, env=env, timeout_s=50)
        else:
            done = demo("--dir", str(tmp_path), env={**env, "ESTAFETA_LISTEN": where}, timeout_s=50)
    # Before: uvicorn's line, then the demo waited forever for a server that never started.
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: cannot serve on {where}" in done.stderr, done.stderr
    assert "address already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "estafeta demo — hub on" not in done.stdout  # it never claimed to run


@pytest.mark.timeout(120)
@pytest.mark.parametrize("named", [True, False], ids=["--dir", "a-temporary-directory"])
def test_a_demo_that_cannot_listen_leaves_nothing_behind(tmp_path: Path, named: bool) -> None:
    # Before: it had written estafeta.toml and a migrated estafeta.db first, so the same
    # `--dir` with a free port was then refused ("already holds estafeta.toml and
    # estafeta.db"), and without --dir a directory nobody was told of stayed in $TMPDIR.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESTAFETA_")}
    env["TMPDIR"] = str(tmp_path)
    workdir = tmp_path / "demo"
    where = ["--dir", str(workdir)] if named else []
    with socket.create_server(("127.0.0.1", 0)) as taken:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        done = demo(*where, "--listen", listen, env=env, timeout_s=50)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: cannot serve on {listen}" in done.stderr, done.stderr
    left = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*"))
    assert left == (["demo"] if named else [])
    if named:  # the reader's next try, on a free port, runs
        again = demo(*where, "--events", "2", env=env)
        assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.timeout(120)
def test_the_demo_takes_a_port_of_0_from_estafeta_listen_as_from_listen(tmp_path: Path) -> None:
    # Before: `ESTAFETA_LISTEN=127.0.0.1:0` served on a free port, but the demo talked to
    # port 0 ("hub on http://127.0.0.1:0") and ended in a ConnectionRefusedError traceback.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESTAFETA_")}
    done = demo(
        "--dir", str(tmp_path), "--events", "2", env={**env, "ESTAFETA_LISTEN": "127.0.0.1:0"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hub on http://127.0.0.1:" in done.stdout
    assert "hub on http://127.0.0.1:0," not in done.stdout, done.stdout
    # Before: its estafeta.toml named another free port, where the printed `serve` listened
    # (ESTAFETA_LISTEN unset, in a new terminal) while the printed curls went to this one.
    hub_port = done.stdout.split("hub on http://127.0.0.1:")[1].split(",")[0]
    written = tomllib.loads((tmp_path / "estafeta.toml").read_text())
    assert written["server"]["listen"] == f"127.0.0.1:{hub_port}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_commands_the_demo_prints_run_as_printed(tmp_path: Path) -> None:
    # Before: it printed `estafeta dlq list …`, but `make demo` runs .venv/bin/estafeta with
    # the virtualenv not on PATH, so the first command a new user copied was not found.
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != bin_dir
    )
    env = {**os.environ, "PATH": path or os.defpath}
    done = subprocess.run(
        [sys.executable, "-m", "estafeta", "demo", "--dir", str(tmp_path), "--events", "4"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    listed = [line for line in done.stdout.splitlines() if " dlq list --config " in line]
    assert len(listed) == 1, done.stdout
    printed = subprocess.run(
        shlex.split(listed[0]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,  # from where the demo ran, as its reader would
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stderr.strip() == "0 dead deliveries", printed.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_keeps_to_its_own_database_whatever_the_environment_says(
    tmp_path: Path,
) -> None:
    # Before: the overrides meant for `serve` applied to the demo too, so a shell set up for
    # production (ESTAFETA_DATABASE_URL …) got the demo's tenant, key and events written
    # into the production database, and its admin key broke the demo's own replay.
    production = tmp_path / "production"
    production.mkdir()
    env = {
        **os.environ,
        "ESTAFETA_DATABASE_URL": f"sqlite:///{production / 'estafeta.db'}",
        "ESTAFETA_ADMIN_KEY": "the-production-admin-key",
        "ESTAFETA_REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens there
    }
    done = demo("--dir", str(tmp_path / "demo"), "--events", "4", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(production.iterdir()) == []
    assert (tmp_path / "demo" / "estafeta.db").exists()
    ignored = "ESTAFETA_ADMIN_KEY, ESTAFETA_DATABASE_URL, ESTAFETA_REDIS_URL"
    assert f"ignores {ignored}" in done.stdout, done.stdout


@pytest.mark.timeout(120)
def test_the_demo_keeps_to_a_directory_whatever_its_name(tmp_path: Path) -> None:
    # Before: the path went into the SQLite URL and the TOML file as it was: a '?' put the
    # database in a file outside the directory ('q' beside 'q?m'), a '%20' or a '"' ended
    # the demo on an invalid configuration, and a space broke the printed commands.
    workdir = tmp_path / """it's a "demo" #1, 100%20 done? \\ yes"""
    done = demo("--dir", str(workdir), "--events", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == [workdir]
    assert (workdir / "estafeta.db").exists()
    listed = [line for line in done.stdout.splitlines() if " dlq list --config " in line]
    assert len(listed) == 1, done.stdout
    printed = subprocess.run(
        shlex.split(listed[0]), capture_output=True, text=True, timeout=60, check=False
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stderr.strip() == "0 dead deliveries", printed.stderr


@pytest.mark.timeout(120)
def test_the_printed_serve_and_curl_commands_work_as_printed(tmp_path: Path) -> None:
    # Before: `curl …/api/v1/events/<id>` was a shell syntax error, and the printed `serve`
    # made ./estafeta-spool in whatever directory the reader ran it from (a clone, or the
    # directory of an installation, whose spooled events it would then drain).
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESTAFETA_")}
    done = demo("--dir", str(tmp_path / "demo"), "--events", "2", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    commands = done.stdout.split("Look further")[1].splitlines()[1:]
    lines = [shlex.split(line, comments=True) for line in commands]
    serve = next(words for words in lines if "serve" in words[1:2])
    curls = [words for words in lines if words[:1] == ["curl"]]
    assert len(curls) == 4, done.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The reader runs it from another directory: a script named relative to where the demo
    # ran (`.venv/bin/estafeta` in a clone) is taken from there.
    serve[0] = str(Path(serve[0]).absolute()) if os.sep in serve[0] else serve[0]
    serving = subprocess.Popen(
        serve, cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        health = curls[-1][-1].replace("/health/detailed", "/health")
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(health, timeout=5)
                break
            except httpx.TransportError:
                assert serving.poll() is None and time.monotonic() < deadline, "not serving"
                time.sleep(0.1)
        for _curl, _h, header, url in curls:
            name, value = header.split(": ", 1)
            answer = httpx.get(url, headers={name: value}, timeout=10)
            assert answer.status_code == 200, (url, answer.text)
    finally:
        serving.send_signal(signal.SIGTERM)
        _, err = serving.communicate(timeout=60)
    assert serving.returncode == 0, err
    assert list(elsewhere.iterdir()) == []
