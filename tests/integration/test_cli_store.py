"""The CLI's store commands (`dlq`, `keys`, `migrate`) in-process, on both engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from estafeta.cli import main
from estafeta.config import load_config
from estafeta.errors import StoreError
from estafeta.server import prepared_store
from tests.conftest import fresh_database


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(config)])


def config_file(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "estafeta.toml"
    path.write_text(
        f'[storage]\nurl = "{database_url}"\nspool_dir = "{tmp_path / "spool"}"\n\n'
        '[[tenants]]\nid = "clinica-sol"\nname = "Clínica Sol"\n'
    )
    return path


def test_a_dead_letter_filter_is_a_selection_whatever_its_value(
    tmp_path: Path, database_url: str
) -> None:
    # `--since` the epoch parses to 0; judged by that value it was refused as no selection.
    config = config_file(tmp_path, database_url)
    assert run(config, "migrate").exit_code == 0
    since_epoch = run(config, "dlq", "replay", "--since", "1970-01-01T00:00:00Z")
    assert (since_epoch.exit_code, since_epoch.output) == (0, "0 deliveries replayed\n")
    nothing = run(config, "dlq", "replay")
    assert nothing.exit_code == 2 and "name --id, a filter, or --all" in nothing.output


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_database_without_the_schema_is_named_not_queried(tmp_path: Path, engine: str) -> None:
    # Before: the driver's "no such table" / "relation does not exist" as a traceback.
    def attempts(database_url: str) -> None:
        config = config_file(tmp_path, database_url)
        commands = (
            ["dlq", "list"],
            ["dlq", "discard", "--all"],
            ["keys", "create", "--tenant", "t"],
        )
        for command in commands:
            result = run(config, *command)
            assert result.exit_code == 2, (command, result.output)
            assert "has no estafeta schema: run `estafeta migrate`" in result.output, result.output
            assert "Traceback" not in result.output
        assert run(config, "migrate").exit_code == 0
        assert run(config, "dlq", "list").exit_code == 0

    if engine == "sqlite":
        attempts(f"sqlite:///{tmp_path / 'never-migrated.db'}")
    else:
        with fresh_database("estafeta_cli") as url:
            attempts(url)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_a_worker_or_serve_without_migrating_names_a_database_without_the_schema(
    tmp_path: Path, engine: str
) -> None:
    # What `estafeta worker` and `serve --no-migrate` start with (run in-process, their
    # event loop runner would tune this test process's garbage collector).
    async def attempt(database_url: str) -> None:
        config = load_config(config_file(tmp_path, database_url))
        with pytest.raises(StoreError, match="has no estafeta schema: run `estafeta migrate`"):
            await prepared_store(config, migrate=False)

    if engine == "sqlite":
        await attempt(f"sqlite:///{tmp_path / 'never-migrated.db'}")
    else:
        with fresh_database("estafeta_cli") as url:
            await attempt(url)
