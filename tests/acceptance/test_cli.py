"""The `estafeta` command as an operator uses it: check-config, migrate, keys, dlq, and a
graceful stop of `serve` while a send is in flight."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner

from estafeta.cli import main
from estafeta.store import open_store
from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    client_session,
    free_port,
    http_destination,
    hub_client,
    hub_config,
    leads_to_crm_config,
    query,
    run_cli,
    send_one_lead,
    settled,
    wait_until,
    write_config,
)
from tests.conftest import fresh_database

# -- check-config -----------------------------------------------------------------------------

BAD_CONFIG = """\
[storage]
url = "sqlite:///estafeta.db"

[[tenants]]
id = "clinica-sol"
ingress_rate_limit = "lots"

[[destinations]]
id = "crm"
tenant = "clinica-sol"
url = "http://127.0.0.1:9/crm"
timeout_s = -1

[[routes]]
tenant = "clinica-sol"
events = ["lead.*"]
destinations = ["crmm"]
"""


async def test_check_config_prints_every_problem_with_its_location(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_CONFIG)
    result = await run_cli("check-config", str(bad), cwd=tmp_path)

    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert (
        f"{bad}: routes[0].destinations[0]: unknown destination 'crmm' (did you mean 'crm'?)"
        in lines
    )
    assert any(
        line.startswith(f"{bad}: tenants[0].ingress_rate_limit: invalid rate limit 'lots'")
        for line in lines
    )
    assert any(line.startswith(f"{bad}: destinations[0].timeout_s: ") for line in lines), lines
    assert lines[-1] == "3 problems found"
    assert result.stdout == ""


async def test_check_config_reports_a_destination_kind_not_available_beside_the_rest(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        BAD_CONFIG
        + """
[[destinations]]
id = "sheet"
tenant = "clinica-sol"
kind = "airtable"

[[destinations]]
id = "typo"
tenant = "clinica-sol"
kind = "airtabel"
"""
    )
    result = await run_cli("check-config", str(bad), cwd=tmp_path)

    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert (
        f"{bad}: destinations[1].kind: destination kind 'airtable' is not available in this"
        " version (available: http)" in lines
    ), lines
    # A kind that does not exist at all is reported once, by the configuration's own check.
    typo = [line for line in lines if "destinations[2].kind" in line]
    assert len(typo) == 1 and "not available" not in typo[0], lines
    assert lines[-1] == "5 problems found"


async def test_check_config_names_every_key_of_another_kind_of_source(tmp_path: Path) -> None:
    # An operator who put `api_key` on a WhatsApp Cloud source believed it protected the
    # source; it loaded and was ignored.
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """\
[[tenants]]
id = "clinica-sol"

[[sources]]
id = "wa-sol"
tenant = "clinica-sol"
kind = "whatsapp_cloud"
app_secret = "s"
api_key = "k"

[[sources]]
id = "crm-events"
tenant = "clinica-sol"
kind = "generic"
api_key = "k"
send_max_attempts = 3
"""
    )
    result = await run_cli("check-config", str(bad), cwd=tmp_path)

    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        f"{bad}: sources[0].api_key: not a key of a whatsapp_cloud source (it takes "
        "app_secret, verify_token, access_token, phone_number_id, api_base, send_rate_limit, "
        "send_max_attempts)",
        f"{bad}: sources[1].send_max_attempts: not a key of a generic source (it takes "
        "secret, api_key, event_type)",
        "2 problems found",
    ]
    assert result.stdout == ""


KIND_FROM_ENV = """\
[[tenants]]
id = "clinica-sol"

[[destinations]]
id = "crm"
tenant = "clinica-sol"
kind = "${CRM_KIND}"
url = "http://127.0.0.1:9/crm"
"""


def test_check_config_judges_a_destination_kind_from_the_environment_as_serve_does(
    tmp_path: Path,
) -> None:
    path = tmp_path / "estafeta.toml"
    path.write_text(KIND_FROM_ENV)

    # `serve` runs this file with CRM_KIND=http: check-config must not refuse it.
    ok = CliRunner().invoke(main, ["check-config", str(path)], env={"CRM_KIND": "http"})
    assert (ok.exit_code, ok.output) == (0, f"{path}: ok\n"), ok.output
    # With CRM_KIND=smtp `serve` refuses to start: check-config says so, naming the kind.
    smtp = CliRunner().invoke(main, ["check-config", str(path)], env={"CRM_KIND": "smtp"})
    assert smtp.exit_code == 1, smtp.output
    assert (
        f"{path}: destinations[0].kind: destination kind 'smtp' is not available in this "
        "version (available: http)" in smtp.output.splitlines()
    ), smtp.output


def test_check_config_reports_absurdly_nested_toml_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")

    result = CliRunner().invoke(main, ["check-config", str(path)])

    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        f"{path}: invalid TOML: arrays or tables nested too deeply",
        "1 problem found",
    ]


async def test_serve_refuses_a_destination_kind_it_cannot_deliver_to(tmp_path: Path) -> None:
    config = hub_config(
        f"sqlite:///{tmp_path / 'estafeta.db'}",
        tmp_path,
        destinations=[
            http_destination("crm", "http://127.0.0.1:9/crm"),
            {"id": "sheet", "tenant": TENANT, "kind": "airtable"},
        ],
        routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm", "sheet"]}],
    )
    path = write_config(tmp_path / "estafeta.toml", config)
    problem = "destinations[1].kind: destination kind 'airtable' is not available in this version"
    for command in ("serve", "worker"):
        result = await run_cli(command, "--config", str(path), cwd=tmp_path, timeout_s=30)

        # Refused before anything starts, rather than accepting events it could never deliver;
        # located in the file as check-config and every other problem of the file are (it was
        # `error: invalid configuration` with the key alone).
        assert result.returncode == 2, result
        assert result.stderr.splitlines()[:2] == [
            "invalid configuration (1 problem):",
            f"  {path}: {problem} (available: http)",
        ], result.stderr
        assert not (tmp_path / "estafeta.db").exists()


async def test_a_setting_serve_cannot_use_is_refused_by_check_config_first(
    tmp_path: Path,
) -> None:
    """A NUL character (TOML's "\\u0000") in `storage.spool_dir`: check-config said ok, then
    `serve` migrated the store and crashed with a traceback (exit 1) making the spool."""
    config = hub_config(
        f"sqlite:///{tmp_path / 'estafeta.db'}",
        tmp_path,
        destinations=[http_destination("crm", "http://127.0.0.1:9/crm")],
        routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}],
    )
    config["storage"]["spool_dir"] = str(tmp_path / "spool\x00")
    path = write_config(tmp_path / "estafeta.toml", config)
    problem = "storage.spool_dir: must not contain a NUL character (\\u0000)"

    checked = await run_cli("check-config", str(path), cwd=tmp_path)
    assert checked.returncode == 1, checked
    assert checked.stderr.splitlines() == [f"{path}: {problem}", "1 problem found"]

    served = await run_cli("serve", "--config", str(path), cwd=tmp_path, timeout_s=30)
    assert served.returncode == 2, served
    assert problem in served.stderr and "Traceback" not in served.stderr, served.stderr
    assert not (tmp_path / "estafeta.db").exists()


async def test_serve_on_an_address_in_use_says_so_and_does_not_claim_to_serve(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = hub_config(
        f"sqlite:///{tmp_path / 'estafeta.db'}",
        tmp_path,
        port=port,
        destinations=[http_destination("crm", "http://127.0.0.1:9/crm")],
        routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}],
    )
    path = write_config(tmp_path / "estafeta.toml", config)
    with socket.create_server(("127.0.0.1", port)):  # another program holds the port
        result = await run_cli("serve", "--config", str(path), cwd=tmp_path, timeout_s=30)

    # Exit 3 says "the store cannot be reached" (uvicorn's own startup-failure status is 3
    # too): an operator, or a supervisor acting on the status, would look at the database.
    assert result.returncode == 2, result
    assert f"error: cannot serve on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "address already in use" in result.stderr, result.stderr
    assert '"event":"serving"' not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("command", "option", "key"),
    [
        ("serve", "--listen", "listen"),
        ("serve", "ESTAFETA_LISTEN", "listen"),
        ("worker", "--metrics-listen", "metrics_listen"),
    ],
)
async def test_an_address_given_on_the_command_line_replaces_an_invalid_one_of_the_file(
    tmp_path: Path, command: str, option: str, key: str
) -> None:
    # Before: exit 2 on the file's `server.listen` (`worker.metrics_listen`), the very value
    # the option replaces. Here the option's address is held by another program, so the
    # command gets as far as using it, and says so.
    port = free_port()
    table = "server" if key == "listen" else "worker"
    config = hub_config(
        f"sqlite:///{tmp_path / 'estafeta.db'}", tmp_path, destinations=[], routes=[]
    )
    path = write_config(tmp_path / "estafeta.toml", config)
    assert (await run_cli("migrate", "--config", str(path), cwd=tmp_path)).returncode == 0
    config[table] = {**config[table], key: "8080"}  # a port alone: not an address
    write_config(path, config)
    given = f"127.0.0.1:{port}"
    args, env = ([option, given], {}) if option.startswith("--") else ([], {option: given})
    with socket.create_server(("127.0.0.1", port)):  # another program holds the port
        result = await run_cli(
            command, "--config", str(path), *args, cwd=tmp_path, env=env, timeout_s=30
        )

    assert result.returncode == 2, result
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr, result.stderr
    assert "invalid address '8080'" not in result.stderr, result.stderr


@pytest.mark.parametrize("host", ["crm..local", "x" * 64, "\udcff"])
def test_a_host_no_resolver_can_take_is_refused_before_serving(tmp_path: Path, host: str) -> None:
    # An empty label, one over 63 characters, a byte not UTF-8: before, the IDNA codec's
    # UnicodeError traceback (exit 1) once the hub had opened its store.
    config = tmp_path / "estafeta.toml"
    config.write_text(  # where nothing is kept, should the address get past the check
        f'[storage]\nurl = "sqlite:///{tmp_path / "estafeta.db"}"\nspool_dir = "{tmp_path}"\n'
    )
    for args, env in (
        (["serve", "--listen", f"{host}:8080"], {}),
        (["worker", "--metrics-listen", f"{host}:8080"], {}),
        (["serve"], {"ESTAFETA_LISTEN": f"{host}:8080"}),
    ):
        result = CliRunner().invoke(main, [*args, "--config", str(config)], env=env)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert f"invalid address {host + ':8080'!r}: " in result.output, result.output


async def test_check_config_points_at_the_line_of_a_toml_syntax_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('[server]\nlisten = "127.0.0.1:8080"\nport = \n')
    result = await run_cli("check-config", str(broken), cwd=tmp_path)

    assert result.returncode == 1, result
    problem, count = result.stderr.splitlines()
    assert "line 3, column 8" in problem and "invalid TOML" in problem, problem
    assert count == "1 problem found"
    # Each problem line names the file once, as for every other kind of problem.
    assert problem.count(str(broken)) == 1, problem


async def test_check_config_names_the_file_once_as_it_was_written(tmp_path: Path) -> None:
    # Before: `./broken.toml: broken.toml:line 1, …`, the file named twice; and a file whose
    # name begins a key's location (`server`) was not named at all: `server.bogus: …`.
    (tmp_path / "broken.toml").write_text("port = \n")
    (tmp_path / "server").write_text("[server]\nbogus = 1\n")
    broken = await run_cli("check-config", "./broken.toml", cwd=tmp_path)
    assert broken.stderr.splitlines() == [
        "./broken.toml:line 1, column 8: invalid TOML: Invalid value",
        "1 problem found",
    ], broken
    named = await run_cli("check-config", "server", cwd=tmp_path)
    assert named.stderr.splitlines() == [
        "server: server.bogus: unknown key 'bogus'",
        "1 problem found",
    ], named


async def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    config = hub_config(
        f"sqlite:///{tmp_path / 'estafeta.db'}",
        tmp_path,
        destinations=[http_destination("crm", "http://127.0.0.1:9/crm")],
        routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}],
    )
    good = write_config(tmp_path / "good.toml", config)
    result = await run_cli("check-config", str(good), cwd=tmp_path)

    assert (result.returncode, result.stdout, result.stderr) == (0, f"{good}: ok\n", "")


# -- migrate and keys -------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_migrate_then_keys_create_prints_a_key_that_publishes_events(
    tmp_path: Path, estafeta: Estafeta
) -> None:
    database_url = f"sqlite:///{tmp_path / 'estafeta.db'}"
    config = write_config(
        tmp_path / "estafeta.toml",
        hub_config(database_url, tmp_path, destinations=[], routes=[]),
    )
    migrated = await run_cli("migrate", "--config", str(config), cwd=tmp_path)
    assert migrated.returncode == 0, migrated
    assert migrated.stdout == "schema is up to date (sqlite)\n"

    created = await run_cli(
        "keys", "create", "--config", str(config), "--tenant", TENANT, cwd=tmp_path
    )
    assert created.returncode == 0, created
    key = created.stdout.strip()
    assert created.stdout == f"{key}\n" and key.startswith("est_"), created.stdout
    assert "not shown again" in created.stderr and key not in created.stderr
    stored = await query(database_url, "SELECT * FROM api_keys")
    assert len(stored) == 1 and key not in repr(stored)  # only a hash is kept

    unknown = await run_cli(
        "keys", "create", "--config", str(config), "--tenant", "nobody", cwd=tmp_path
    )
    assert unknown.returncode == 2, unknown
    assert "no tenant 'nobody'" in unknown.stderr and unknown.stdout == "", unknown

    serve = await estafeta.serve(config)
    async with hub_client(serve) as hub:
        # Its in-process worker logs the id /health/detailed lists the process under.
        started = await serve.wait_log("worker_started")
        health = await hub.get_json("/health/detailed")
        assert [p["id"] for p in health["checks"]["processes"]] == [started["worker"]]
        bearer = {"authorization": f"Bearer {key}"}
        event = {"type": "lead.created", "data": {"name": "Maria"}, "idempotency_key": "lead-1"}
        status, answer = await hub.post_json("/api/v1/events", event, headers=bearer)
        assert status == 202, answer
        assert answer["duplicate"] is False
        stored_event = await hub.get_json(f"/api/v1/events/{answer['id']}", headers=bearer)
        assert stored_event["type"] == "lead.created"
        assert stored_event["tenant"] == TENANT

        status, again = await hub.post_json("/api/v1/events", event, headers=bearer)
        assert (status, again) == (200, {"id": answer["id"], "duplicate": True})
        wrong = {"authorization": "Bearer est_not-a-key"}
        status, refused = await hub.post_json("/api/v1/events", event, headers=wrong)
        assert status == 401, refused


async def test_migrate_takes_a_postgresql_url_with_libpqs_sslmode(tmp_path: Path) -> None:
    """`?sslmode=require` is how hosted PostgreSQL services give their URL. check-config
    passed it, then `migrate` and `serve` died with a traceback: asyncpg has no `sslmode`
    (the store passes it on as `ssl`, which takes the same modes)."""
    with fresh_database("estafeta_sslmode") as url:
        config = write_config(
            tmp_path / "estafeta.toml",
            hub_config(f"{url}?sslmode=disable", tmp_path, destinations=[], routes=[]),
        )
        migrated = await run_cli("migrate", "--config", str(config), cwd=tmp_path)
    assert migrated.returncode == 0, migrated
    assert migrated.stdout == "schema is up to date (postgresql)\n"


@pytest.mark.timeout(60)
async def test_serve_on_port_0_says_which_port_it_bound(tmp_path: Path, estafeta: Estafeta) -> None:
    # Before: `serving` said "127.0.0.1:0", so whoever started it on any free port (a test
    # harness, a supervisor) could not tell where it listened.
    database_url = f"sqlite:///{tmp_path / 'estafeta.db'}"
    config = write_config(
        tmp_path / "estafeta.toml",
        hub_config(database_url, tmp_path, port=0, destinations=[], routes=[]),
    )
    serve = estafeta.start("serve", "serve", "--config", str(config))
    serving = await serve.wait_log("serving")
    host, _, port = serving["listen"].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0, serving
    async with client_session() as http, http.get(f"http://127.0.0.1:{port}/health") as health:
        assert health.status == 200
    assert await serve.stop() == 0, serve.tail()
    [stopped] = [e for e in serve.log_events() if e.get("event") == "server_stopped"]
    # `addresses` too: a name such as localhost binds two, and only `serving` listed them.
    assert (stopped["listen"], stopped["addresses"]) == (serving["listen"], serving["addresses"])


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_worker_says_which_engine_it_runs_on(
    database_url: str, tmp_path: Path, estafeta: Estafeta
) -> None:
    # docs/how-to/deploy-postgresql.md has the operator check that every process logs
    # "engine":"postgresql": `serve` did (`serving`), a separate worker's `worker_started` did
    # not, so a worker left on the default SQLite file could not be told from the log.
    config = write_config(
        tmp_path / "estafeta.toml",
        hub_config(database_url, tmp_path, destinations=[], routes=[]),
    )
    migrated = await run_cli("migrate", "--config", str(config), cwd=tmp_path)
    assert migrated.returncode == 0, migrated

    worker = estafeta.worker(config)
    started = await worker.wait_log("worker_started")
    assert started["engine"] == ("sqlite" if database_url.startswith("sqlite") else "postgresql")
    # The id it logs is the one /health/detailed lists among the processes: an operator
    # follows one process from the health check to its log lines.
    store = open_store(database_url)
    try:
        listed = await store.live_processes(seen_since_ms=0)
    finally:
        await store.close()
    assert [p.id for p in listed] == [started["worker"]]
    assert await worker.stop() == 0


# -- the dead-letter queue --------------------------------------------------------------------


# Nine CLI runs and two starts of serve: 46 s seen on a loaded 2-core machine.
@pytest.mark.timeout(120)
async def test_dlq_list_replay_and_discard(tmp_path: Path, estafeta: Estafeta, sink: Sink) -> None:
    database_url = f"sqlite:///{tmp_path / 'estafeta.db'}"
    sink.respond(500)  # both destinations are down: one attempt each, straight to the DLQ
    config = write_config(
        tmp_path / "estafeta.toml",
        hub_config(
            database_url,
            tmp_path,
            destinations=[
                http_destination("crm", f"{sink.url}/hooks/crm", max_attempts=1),
                http_destination("billing", f"{sink.url}/hooks/billing", max_attempts=1),
            ],
            routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm", "billing"]}],
        ),
    )
    serve = await estafeta.serve(config)
    async with hub_client(serve) as hub:
        sent = await hub.send_leads(5)
        assert sent.statuses == [202] * 5
        events = sent.acknowledged

        async def all_dead() -> bool:
            return (await hub.queue()).get("dead", 0) == 10

        await wait_until(all_dead, timeout_s=30, what="10 dead deliveries")
    await serve.stop()

    async def dlq(*args: str) -> tuple[int, list[str], str]:
        result = await run_cli("dlq", *args, "--config", str(config), cwd=tmp_path)
        return result.returncode, result.stdout.splitlines(), result.stderr

    code, lines, err = await dlq("list")
    assert code == 0, err
    assert len(lines) == 10 and err.strip() == "10 dead deliveries", (lines, err)
    assert all("attempts=1" in line and "http_500" in line for line in lines), lines

    code, lines, err = await dlq("list", "--json")
    dead: list[dict[str, Any]] = [orjson.loads(line) for line in lines]
    assert {d["state"] for d in dead} == {"dead"}
    assert {d["event_id"] for d in dead} == events
    billing_dead = sorted(d["id"] for d in dead if d["destination"] == "billing")
    crm_dead = sorted(d["id"] for d in dead if d["destination"] == "crm")
    assert len(billing_dead) == len(crm_dead) == 5

    code, lines, err = await dlq("replay")  # no selector: refused, nothing moves
    assert code == 2 and "name --id, a filter, or --all" in err, (code, err)
    assert len((await dlq("list"))[1]) == 10

    code, lines, err = await dlq("replay", "--destination", "billing")
    assert code == 0, err
    assert (lines, err.strip()) == (billing_dead, "5 deliveries replayed")
    assert (await dlq("list", "--destination", "billing"))[1] == []
    assert len((await dlq("list"))[1]) == 5

    code, lines, err = await dlq("discard", "--all")
    assert code == 0, err
    assert (lines, err.strip()) == (crm_dead, "5 deliveries discarded")
    code, lines, err = await dlq("list")
    assert (code, lines, err.strip()) == (0, [], "0 dead deliveries")

    # Billing is back: the replayed deliveries go out, the discarded ones never do.
    sink.respond(200)
    serve = await estafeta.serve(config, name="serve-again")

    def billing_got_all(s: Sink) -> bool:
        ok = {r.webhook_id for r in s.received if r.status == 200 and r.path == "/hooks/billing"}
        return events <= ok

    assert await sink.wait_for(billing_got_all, 30), "replayed deliveries not delivered"
    async with hub_client(serve) as hub:
        assert await settled(hub, database_url, timeout_s=20) == {
            "succeeded": 5,
            "discarded": 5,
        }
    assert not any(r.status == 200 and r.path == "/hooks/crm" for r in sink.received)


# -- graceful shutdown ------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("grace_s", "send_s", "expected"),
    [
        pytest.param(10.0, 1.0, ("succeeded", 1), id="send-finishes-within-grace"),
        pytest.param(0.3, 5.0, ("pending", 0), id="send-given-back-after-grace"),
    ],
)
async def test_sigterm_stops_serve_cleanly_with_a_send_in_flight(
    database_url: str,
    tmp_path: Path,
    estafeta: Estafeta,
    sink: Sink,
    grace_s: float,
    send_s: float,
    expected: tuple[str, int],
) -> None:
    """SIGTERM → exit 0 within the grace period; the delivery is never left in flight."""
    sink.respond(200, delay_s=send_s)
    config = leads_to_crm_config(
        database_url,
        tmp_path,
        sink.url,
        timeout_s=10,
        worker={"shutdown_grace_s": grace_s},
    )
    serve = await estafeta.serve(config)
    event_id = await send_one_lead(serve)
    assert await sink.wait_for(lambda s: len(s.received) == 1, 10), "the send never started"

    stopping = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    exit_code = await serve.wait_exit(grace_s + 10)
    took = time.monotonic() - stopping

    rows = await query(
        database_url, "SELECT state, attempts, lease_token, leased_by FROM deliveries"
    )
    assert rows == [(*expected, None, None)], rows
    assert took < grace_s + 5, f"took {took:.1f} s to stop with a {grace_s} s grace"

    # Restarted, the hub finishes the job: the delivery succeeds, nothing is lost.
    sink.respond(200)
    again = await estafeta.serve(config, name="serve-again")
    async with hub_client(again) as hub:
        assert await settled(hub, database_url, timeout_s=20) == {"succeeded": 1}
        delivery = await hub.delivery(event_id, "crm")
        assert [a["status_code"] for a in delivery["attempt_log"]] == [200]
    assert event_id in sink.delivered_ids

    # Last, so that the state checks above run whatever the exit code: a graceful stop
    # on SIGTERM is a success for process supervisors (systemd, Kubernetes, Docker).
    assert exit_code == 0, (
        f"`estafeta serve` exited {exit_code} after a graceful SIGTERM shutdown "
        f"(-{signal.SIGTERM.value} = killed by SIGTERM)\n{serve.tail()}"
    )


# -- the reference ----------------------------------------------------------------------------

CLI_REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def documented_options() -> dict[str, set[str]]:
    """Each `## \\`estafeta …\\`` section's title and the --options it names."""
    sections = re.split(r"^## ", CLI_REFERENCE.read_text(encoding="utf-8"), flags=re.M)[1:]
    return {
        section.splitlines()[0]: set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", section))
        for section in sections
        if section.startswith("`estafeta ")
    }


def command_options(*path: str) -> set[str]:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return {o for p in command.params for o in p.opts if o.startswith("--")}


@pytest.mark.parametrize(
    ("title", "commands"),
    [
        ("`estafeta serve`", [("serve",)]),
        ("`estafeta worker`", [("worker",)]),
        ("`estafeta migrate`", [("migrate",)]),
        ("`estafeta check-config`", [("check-config",)]),
        ("`estafeta keys create`", [("keys", "create")]),
        ("`estafeta keys list`", [("keys", "list")]),
        ("`estafeta keys revoke`", [("keys", "revoke")]),
        (
            "`estafeta dlq list | replay | discard`",
            [("dlq", c) for c in ("list", "replay", "discard")],
        ),
        ("`estafeta demo`", [("demo",)]),
    ],
)
def test_each_commands_options_are_the_ones_docs_cli_names(
    title: str, commands: list[tuple[str, ...]]
) -> None:
    documented = documented_options()[title]
    for path in commands:
        assert command_options(*path) - documented == set(), path  # each option is documented
    assert documented - set().union(*(command_options(*p) for p in commands)) == set()
