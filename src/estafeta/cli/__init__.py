"""The `estafeta` command (DESIGN.md §3.1): one module per group of commands.

* `running.py`: serve, worker, migrate, check-config, demo;
* `dlq.py`: the dead-letter queue;
* `keys.py`: tenants' API keys;
* `common.py`: the --config option, the store, and the exit codes every command shares.
"""

from __future__ import annotations

import logging

import click

from estafeta import __version__
from estafeta.cli import dlq, keys, running
from estafeta.observability.logging import configure_logging


def _checked_log_level(value: str) -> str:
    if not isinstance(logging.getLevelName(value.upper()), int):  # else the level's name
        raise click.BadParameter(f"{value!r}: use debug, info, warning or error")
    return value


@click.group()
@click.version_option(__version__, prog_name="estafeta")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="ESTAFETA_LOG_LEVEL",
    callback=lambda _ctx, _param, value: _checked_log_level(value),
    help="debug, info, warning or error",
)
def main(log_level: str) -> None:
    """estafeta: receive webhooks, route them, deliver them, never lose one."""
    configure_logging(log_level)


for command in (
    running.serve,
    running.worker,
    running.migrate,
    running.check_config_command,
    running.demo,
    dlq.dlq,
    keys.keys,
):
    main.add_command(command)

__all__ = ["main"]
