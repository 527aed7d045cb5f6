"""`estafeta keys create / list / revoke`: tenants' API keys, from the command line.

A key is shown once, when it is created; the store keeps its hash, and neither the key nor
the hash is ever printed again. Creating and revoking are written to the audit log.
"""

from __future__ import annotations

import asyncio
import errno
import sys

import click
import orjson

from estafeta.cli.common import (
    LABEL,
    NAME,
    config_option,
    counted,
    error_text,
    in_store,
    load,
    operator,
    out,
    printable,
    with_store,
)
from estafeta.clock import SystemClock, iso_from_ms
from estafeta.config import Config
from estafeta.errors import EstafetaError
from estafeta.ids import new_id
from estafeta.store.records import ApiKeyView
from estafeta.store.sqlstore import SqlStore


def key_json(key: ApiKeyView) -> dict[str, object]:
    return {
        "id": key.id,
        "tenant": key.tenant_id,
        "label": key.label,
        "created_at": iso_from_ms(key.created_at),
        "revoked_at": None if key.revoked_at is None else iso_from_ms(key.revoked_at),
        "active": key.active,
    }


@click.group()
def keys() -> None:
    """Tenant API keys."""


@keys.command("create")
@config_option
@click.option("--tenant", required=True, type=NAME, help="the tenant the key belongs to")
@click.option(
    "--label",
    default="",
    type=LABEL,
    help=f"a note to recognise the key by (up to {LABEL.MAX} characters)",
)
def keys_create(config_path: str, tenant: str, label: str) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    from estafeta.api.auth import hash_key, new_api_key

    config = load(config_path)
    key = new_api_key()
    # Chosen here, not by the store: a Ctrl-C after the commit, before the store has said
    # the id, must still find the key to revoke it.
    key_id = new_id("key")
    creating = False  # from then on the key may be committed

    async def action(store: SqlStore) -> str:
        nonlocal creating
        # The store keeps a tenant taken out of the file, but the API refuses its keys.
        if tenant not in {t.id for t in config.tenants}:
            raise EstafetaError(
                f"no tenant '{printable(tenant)}' in the configuration: the API would refuse"
                " its key"
            )
        if not await store.tenant_exists(tenant):
            raise EstafetaError(f"no tenant {tenant!r} in the store (run `estafeta migrate`)")
        creating = True
        return await store.create_api_key(
            tenant_id=tenant,
            key_hash=hash_key(key),
            label=label,
            actor=operator(),
            now_ms=SystemClock().now_ms(),
            key_id=key_id,
        )

    try:
        in_store(config, action)
        try:
            _print_key(key)
        except OSError as exc:
            sys.stdout = None  # no second failing flush at exit
            unseen = _revoke_unseen(config, key_id)
            click.echo(f"error: cannot print the key ({exc.strerror}): {unseen}", err=True)
            sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C before the key was shown: it would stay active with no one holding it.
        # Said after "interrupted (Ctrl-C): " by the `estafeta` group, exit 130.
        if not creating:
            raise
        raise KeyboardInterrupt(_revoke_unseen(config, key_id)) from None
    click.echo(f"(key {key_id} for tenant {tenant}; store it now, it is not shown again)", err=True)


def _revoke_unseen(config: Config, key_id: str) -> str:
    """Revoke the key just made that no one was shown; what became of it, as the error
    says it (the key may never have been committed). A store that fails, or a second
    Ctrl-C, may leave it active: the operator is told which key to revoke."""

    async def revoke(store: SqlStore) -> object:
        return await store.revoke_api_key(key_id, actor=operator(), now_ms=SystemClock().now_ms())

    try:
        revoked = asyncio.run(with_store(config, revoke))
    except (EstafetaError, KeyboardInterrupt) as exc:
        why = "" if isinstance(exc, KeyboardInterrupt) else f" ({error_text(config, exc)})"
        return (
            f"key {key_id} may be active, never shown{why}: revoke it"
            f" (estafeta keys revoke {key_id})"
        )
    return "stopped, no key was made" if revoked is None else f"key {key_id} revoked"


def _print_key(key: str) -> None:
    """The key on stdout, flushed; OSError when it did not get there (click.echo drops what
    it writes to a closed stdout without a word)."""
    if sys.stdout is None:
        raise OSError(errno.EBADF, "stdout is closed")
    sys.stdout.write(f"{key}\n")
    sys.stdout.flush()


@keys.command("list")
@config_option
@click.option("--tenant", default=None, type=NAME, help="only this tenant's keys")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def keys_list(config_path: str, tenant: str | None, as_json: bool) -> None:
    """List API keys, revoked ones too (never the keys themselves)."""
    config = load(config_path)

    async def action(store: SqlStore) -> list[ApiKeyView]:
        if tenant is not None and not await store.tenant_exists(tenant):
            raise EstafetaError(f"--tenant {tenant!r}: no such tenant in the store")
        return await store.list_api_keys(tenant)

    found = in_store(config, action)
    for key in found:
        if as_json:
            out(orjson.dumps(key_json(key)).decode())
            continue
        status = "active" if key.revoked_at is None else f"revoked {iso_from_ms(key.revoked_at)}"
        out(
            f"{key.id}  {key.tenant_id}  created {iso_from_ms(key.created_at)}  {status}  "
            f"{printable(key.label)}".rstrip()
        )
    active = sum(key.active for key in found)
    click.echo(f"{counted(len(found), 'key', 'keys')} ({active} active)", err=True)


@keys.command("revoke")
@config_option
@click.argument("key_id", type=NAME)
def keys_revoke(config_path: str, key_id: str) -> None:
    """Revoke an API key: refused from then on (within the API's 10 s cache of keys)."""
    config = load(config_path)

    async def action(store: SqlStore) -> tuple[ApiKeyView, bool]:
        revoked = await store.revoke_api_key(
            key_id, actor=operator(), now_ms=SystemClock().now_ms()
        )
        if revoked is None:
            raise EstafetaError(f"no API key '{printable(key_id)}' in the store")
        return revoked

    key, now = in_store(config, action)
    assert key.revoked_at is not None  # noqa: S101 - revoke_api_key returns it revoked
    when = iso_from_ms(key.revoked_at)
    if now:
        out(f"key {key.id} of tenant {key.tenant_id} revoked at {when}")
    else:
        out(f"key {key.id} of tenant {key.tenant_id} was already revoked at {when}")
