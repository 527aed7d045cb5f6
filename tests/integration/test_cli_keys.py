"""`estafeta keys create / list / revoke` on both engines, and what a revoked key gets from
the API: an operator whose key leaked lists the tenant's keys, revokes the one that leaked,
and the API refuses it from then on (at the latest when the API's key cache expires)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from starlette.requests import Request

from estafeta.api.auth import _CACHE_TTL_S, Authenticator, hash_key, new_api_key
from estafeta.cli import main
from estafeta.errors import HttpError, StoreUnavailable
from estafeta.store import open_store
from estafeta.store.api_keys import ApiKeyOps
from estafeta.store.sqlstore import SqlStore
from tests.integration.store_support import rows
from tests.integration.test_cli_store import (
    estafeta_process,
    with_reader_gone,
    with_stdout,
    with_terminal_hung_up,
)

TENANT, OTHER = "clinica-sol", "outra"


def config_file(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "estafeta.toml"
    path.write_text(
        f'[storage]\nurl = "{database_url}"\nspool_dir = "{tmp_path / "spool"}"\n\n'
        f'[[tenants]]\nid = "{TENANT}"\nname = "Clínica Sol"\n\n'
        f'[[tenants]]\nid = "{OTHER}"\nname = "Outra"\n'
    )
    return path


def run(config: Path, *args: str) -> Result:
    return CliRunner(env={"USER": "ana"}).invoke(main, [*args, "--config", str(config)])


def create(config_path: Path, tenant: str, label: str = "") -> tuple[str, str]:
    """A new key of `tenant`: (its id, the key)."""
    result = run(config_path, "keys", "create", "--tenant", tenant, "--label", label)
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    key_id = result.stderr.split("(key ", 1)[1].split()[0]
    return key_id, key


@pytest.fixture
def config_path(tmp_path: Path, database_url: str) -> Path:
    path = config_file(tmp_path, database_url)
    assert run(path, "migrate").exit_code == 0
    return path


def test_keys_list_shows_every_key_but_never_the_key_or_its_hash(
    config_path: Path, database_url: str
) -> None:
    sol_id, sol_key = create(config_path, TENANT, "n8n da recepção")
    other_id, other_key = create(config_path, OTHER)

    listed = run(config_path, "keys", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[sol_id, TENANT], [other_id, OTHER]]
    assert "active" in lines[0] and lines[0].endswith("n8n da recepção")
    assert listed.stderr == "2 keys (2 active)\n"
    hashes = {h for (h,) in rows(database_url, "SELECT key_hash FROM api_keys")}
    for secret in (sol_key, other_key, *hashes):
        assert secret not in listed.output

    only_sol = run(config_path, "keys", "list", "--tenant", TENANT, "--json")
    assert only_sol.exit_code == 0, only_sol.output
    [entry] = [orjson.loads(line) for line in only_sol.stdout.splitlines()]
    assert entry["id"] == sol_id and entry["tenant"] == TENANT
    assert (entry["label"], entry["active"], entry["revoked_at"]) == ("n8n da recepção", True, None)
    assert entry["created_at"].endswith("Z")
    assert set(entry) == {"id", "tenant", "label", "created_at", "revoked_at", "active"}

    typo = run(config_path, "keys", "list", "--tenant", "clinica-so1")
    assert (typo.exit_code, typo.stdout) == (2, "")
    assert typo.stderr == "error: --tenant 'clinica-so1': no such tenant in the store\n"


def test_a_label_cannot_drive_the_terminal_of_whoever_lists_the_keys(
    config_path: Path, database_url: str
) -> None:
    # An operator's label is shown on others' terminals: ESC [2J would clear the screen and
    # a right-to-left override would reorder the line. `keys create` refuses control
    # characters now; a label stored by an earlier version may hold them.
    async def stored_earlier() -> None:
        store = open_store(database_url)
        try:
            await store.create_api_key(
                tenant_id=TENANT,
                key_hash=hash_key(new_api_key()),
                label="recepção\x1b[2J\u202eevil\nsecond line",
                actor="cli:ana",
                now_ms=1,
            )
        finally:
            await store.close()

    asyncio.run(stored_earlier())
    listed = run(config_path, "keys", "list")
    assert listed.exit_code == 0, listed.output
    [line] = listed.stdout.splitlines()
    assert line.endswith("recepção\\x1b[2J\\u202eevil\\nsecond line")
    assert listed.stderr == "1 key (1 active)\n"
    assert "\x1b" not in listed.stdout and "\u202e" not in listed.stdout
    as_json = run(config_path, "keys", "list", "--json")
    assert orjson.loads(as_json.stdout)["label"] == "recepção\x1b[2J\u202eevil\nsecond line"


def test_revoke_is_recorded_once_and_said_again_unchanged(
    config_path: Path, database_url: str
) -> None:
    key_id, _ = create(config_path, TENANT)
    kept_id, _ = create(config_path, TENANT)

    first = run(config_path, "keys", "revoke", key_id)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith(f"key {key_id} of tenant {TENANT} revoked at ")
    revoked_at = first.stdout.rsplit(" ", 1)[1].strip()

    again = run(config_path, "keys", "revoke", key_id)
    assert again.exit_code == 0, again.output
    assert again.stdout == f"key {key_id} of tenant {TENANT} was already revoked at {revoked_at}\n"

    listed = [
        orjson.loads(line) for line in run(config_path, "keys", "list", "--json").stdout.split()
    ]
    assert [(k["id"], k["active"], k["revoked_at"]) for k in listed] == [
        (key_id, False, revoked_at),
        (kept_id, True, None),
    ]
    assert "revoked " + revoked_at in run(config_path, "keys", "list").stdout.splitlines()[0]

    audited = rows(
        database_url, "SELECT action, actor, tenant_id, detail FROM audit_log ORDER BY id"
    )
    assert [(a, actor, t, orjson.loads(str(d))) for a, actor, t, d in audited] == [
        ("keys.create", "cli:ana", TENANT, {"key": key_id}),
        ("keys.create", "cli:ana", TENANT, {"key": kept_id}),
        ("keys.revoke", "cli:ana", TENANT, {"key": key_id}),  # once: the second changed nothing
    ]


def test_revoking_a_key_that_does_not_exist_is_an_error_and_changes_nothing(
    config_path: Path, database_url: str
) -> None:
    key_id, _ = create(config_path, TENANT)
    unknown = run(config_path, "keys", "revoke", "key_nope\x1b[2J")
    assert (unknown.exit_code, unknown.stdout) == (2, "")
    assert unknown.stderr == "error: no API key 'key_nope\\x1b[2J' in the store\n"
    assert rows(database_url, "SELECT id, revoked_at FROM api_keys") == [(key_id, None)]
    assert rows(database_url, "SELECT action FROM audit_log") == [("keys.create",)]


def test_a_key_is_not_made_for_a_tenant_taken_out_of_the_configuration(
    config_path: Path, database_url: str
) -> None:
    # The store keeps a tenant taken out of the file, and the API refuses its keys: a key
    # made for it was printed with "store it now" and answered 401 on its every use.
    text = config_path.read_text()
    config_path.write_text(text.split(f'\n[[tenants]]\nid = "{OTHER}"', 1)[0])
    refused = run(config_path, "keys", "create", "--tenant", OTHER)
    assert (refused.exit_code, refused.stdout) == (2, "")
    assert refused.stderr == (
        f"error: no tenant '{OTHER}' in the configuration: the API would refuse its key\n"
    )
    assert rows(database_url, "SELECT id FROM api_keys") == []
    create(config_path, TENANT)


def test_a_key_is_not_made_for_a_tenant_the_store_does_not_have_yet(
    config_path: Path, database_url: str
) -> None:
    # A tenant added to the file after the last `migrate` (or `serve`) is not in the store:
    # the key's row would name no tenant. The command says what to run.
    with config_path.open("a") as file:
        file.write('\n[[tenants]]\nid = "nova"\nname = "Nova"\n')
    refused = run(config_path, "keys", "create", "--tenant", "nova")
    assert (refused.exit_code, refused.stdout) == (2, "")
    assert refused.stderr == "error: no tenant 'nova' in the store (run `estafeta migrate`)\n"
    assert rows(database_url, "SELECT id FROM api_keys") == []
    assert run(config_path, "migrate").exit_code == 0
    create(config_path, "nova")


@pytest.mark.parametrize(
    ("stdout", "why"),
    [
        ("/dev/full", "No space left on device"),
        (None, "stdout is closed"),
        ("gone", "Broken pipe"),
        ("hung up", "Input/output error"),
    ],
)
def test_a_key_that_cannot_be_printed_is_revoked_not_left_active(
    config_path: Path, database_url: str, stdout: str | None, why: str
) -> None:
    # Before: with stdout closed the key was printed to no one, and on a full disk after a
    # traceback, while the store kept it active: a key nobody has, never to be shown again.
    command = estafeta_process(config_path, "keys", "create", "--tenant", TENANT)
    if stdout == "gone":  # `estafeta keys create … | head -0`
        result = with_reader_gone(command)
    elif stdout == "hung up":  # a terminal whose SSH session closed
        result = with_terminal_hung_up(command)
    else:
        result = with_stdout(command, stdout)
    stderr = result.stderr.decode()
    [(key_id, revoked_at)] = rows(database_url, "SELECT id, revoked_at FROM api_keys")
    assert result.returncode == 2, stderr
    assert stderr == f"error: cannot print the key ({why}): key {key_id} revoked\n"
    assert revoked_at is not None


def ctrl_c_after_the_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C once the new key is committed, before the store has said its id."""
    create_api_key = ApiKeyOps.create_api_key

    async def then_ctrl_c(self: ApiKeyOps, **fields: Any) -> str:
        await create_api_key(self, **fields)
        raise KeyboardInterrupt

    monkeypatch.setattr(ApiKeyOps, "create_api_key", then_ctrl_c)


def ctrl_c_while_printing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as the key, committed, was about to be printed."""

    def interrupted(key: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("estafeta.cli.keys._print_key", interrupted)


@pytest.mark.parametrize("interrupt", [ctrl_c_after_the_commit, ctrl_c_while_printing])
def test_a_key_interrupted_before_it_was_shown_is_revoked_not_left_active(
    config_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    interrupt: Callable[[pytest.MonkeyPatch], None],
) -> None:
    # Before: "error: interrupted (Ctrl-C): stopped", exit 130, and the key committed stayed
    # active, shown to no one: a key nobody has, never to be shown again.
    interrupt(monkeypatch)
    done = run(config_path, "keys", "create", "--tenant", TENANT)
    [(key_id, revoked_at)] = rows(database_url, "SELECT id, revoked_at FROM api_keys")
    assert (done.exit_code, done.stdout) == (130, ""), done.output
    assert done.stderr.splitlines()[-1] == f"error: interrupted (Ctrl-C): key {key_id} revoked"
    assert revoked_at is not None
    audited = rows(database_url, "SELECT action, detail FROM audit_log ORDER BY id")
    assert [(action, orjson.loads(str(detail))) for action, detail in audited] == [
        ("keys.create", {"key": key_id}),
        ("keys.revoke", {"key": key_id}),
    ]


def test_a_key_interrupted_before_its_commit_is_not_made(
    config_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ctrl_c_first(self: ApiKeyOps, **fields: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(ApiKeyOps, "create_api_key", ctrl_c_first)
    done = run(config_path, "keys", "create", "--tenant", TENANT)
    assert (done.exit_code, done.stdout) == (130, ""), done.output
    assert done.stderr.splitlines()[-1] == "error: interrupted (Ctrl-C): stopped, no key was made"
    assert rows(database_url, "SELECT id FROM api_keys") == []
    assert rows(database_url, "SELECT action FROM audit_log") == []


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        (KeyboardInterrupt(), ""),
        (
            StoreUnavailable("the store cannot be reached: ConnectionResetError"),
            "cannot be reached",
        ),
    ],
    ids=["second ctrl-c", "store gone"],
)
def test_a_key_whose_revocation_fails_is_named_to_be_revoked(
    config_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    failure: BaseException,
    why: str,
) -> None:
    # A second Ctrl-C while the unseen key is revoked stops that too, and a store that has
    # gone cannot revoke it: the key is left active, and the operator told which it is.
    ctrl_c_while_printing(monkeypatch)

    async def failing(self: ApiKeyOps, key_id: str, **fields: Any) -> None:
        raise failure

    monkeypatch.setattr(ApiKeyOps, "revoke_api_key", failing)
    done = run(config_path, "keys", "create", "--tenant", TENANT)
    [(key_id, revoked_at)] = rows(database_url, "SELECT id, revoked_at FROM api_keys")
    assert (done.exit_code, done.stdout, revoked_at) == (130, "", None), done.output
    said = done.stderr.splitlines()[-1]
    assert said.startswith(f"error: interrupted (Ctrl-C): key {key_id} may be active"), said
    assert said.endswith(f": revoke it (estafeta keys revoke {key_id})"), said
    assert why in said


# -- what the API does with a revoked key -------------------------------------------------------


def bearer(key: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})


async def test_a_revoked_key_is_refused_once_the_key_cache_expires(store: SqlStore) -> None:
    key = new_api_key()
    key_id = await store.create_api_key(
        tenant_id=TENANT, key_hash=hash_key(key), label="", actor="test", now_ms=1
    )
    now = [1000.0]
    auth = Authenticator(store, admin_key=None, monotonic=lambda: now[0])
    assert (await auth.principal(bearer(key))).tenant_id == TENANT  # now cached

    assert await store.revoke_api_key(key_id, actor="test", now_ms=2) is not None
    now[0] += _CACHE_TTL_S - 0.001
    assert (await auth.principal(bearer(key))).tenant_id == TENANT  # the cache's last moment
    now[0] += 0.002
    with pytest.raises(HttpError) as refused:
        await auth.principal(bearer(key))
    assert (refused.value.status, refused.value.error) == (401, "invalid_api_key")
    # A key not cached yet (another API process) is refused at once.
    with pytest.raises(HttpError) as at_once:
        await Authenticator(store, admin_key=None).principal(bearer(key))
    assert at_once.value.error == "invalid_api_key"


async def test_a_flood_of_made_up_keys_neither_pushes_out_good_keys_nor_asks_twice(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random keys from a scanner cost one lookup each per cache interval, and every tenant's
    good key stays answered from memory meanwhile: the cache used to empty itself for them."""
    key = new_api_key()
    await store.create_api_key(
        tenant_id=TENANT, key_hash=hash_key(key), label="", actor="test", now_ms=1
    )
    looked_up: list[str] = []
    lookup = store.tenant_for_key

    async def counted(key_hash: str) -> str | None:
        looked_up.append(key_hash)
        return await lookup(key_hash)

    monkeypatch.setattr(store, "tenant_for_key", counted)
    auth = Authenticator(store, admin_key=None, monotonic=lambda: 1000.0, unknown_limit=50)
    assert (await auth.principal(bearer(key))).tenant_id == TENANT
    made_up = [new_api_key() for _ in range(120)]
    # The last 20 a second time: still remembered (the unknown ones are emptied at 50, 100)
    for attempt in (*made_up, *made_up[-20:]):
        with pytest.raises(HttpError) as refused:
            await auth.principal(bearer(attempt))
        assert refused.value.error == "invalid_api_key"
    assert (await auth.principal(bearer(key))).tenant_id == TENANT
    assert looked_up == [hash_key(k) for k in (key, *made_up)]
