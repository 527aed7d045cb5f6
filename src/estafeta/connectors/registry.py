"""The connector of each destination, built from the configuration.

One pooled aiohttp session serves every HTTP destination (keep-alive per host); it must be
created inside the running event loop, hence `start()`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

import aiohttp

from estafeta.config import Config
from estafeta.config.models import DEFAULT_TIMEOUTS_S, DestinationConfig
from estafeta.connectors.base import Connector
from estafeta.connectors.http import HttpConnector, new_client_session
from estafeta.connectors.tls import TlsFileProblem
from estafeta.connectors.whatsapp.connector import WhatsAppSendConnector, client_for
from estafeta.errors import ConfigError, ConfigIssue
from estafeta.messaging.facts import send_destination
from estafeta.messaging.outbound import can_send

# Destination kinds this version can deliver to; the others arrive with the connectors issue.
AVAILABLE_KINDS = frozenset({"http"})


def unavailable_kinds(config: Config) -> list[ConfigIssue]:
    """A problem for every destination whose kind this version cannot deliver to."""
    return unavailable_kinds_of([d.kind for d in config.destinations])


def unavailable_kinds_of(kinds: Sequence[object]) -> list[ConfigIssue]:
    """The same from the destinations' `kind` values alone, in file order: `check-config`
    reports them beside a file's other problems, before the file is valid."""
    return [
        ConfigIssue(
            f"destinations[{index}].kind",
            f"destination kind {kind!r} is not available in this version "
            f"(available: {', '.join(sorted(AVAILABLE_KINDS))})",
        )
        for index, kind in enumerate(kinds)
        if isinstance(kind, str) and kind not in AVAILABLE_KINDS
    ]


class Connectors:
    def __init__(self, config: Config) -> None:
        issues = unavailable_kinds(config)
        if issues:
            raise ConfigError(issues)
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._by_destination: dict[str, Connector] = {}

    async def start(self) -> None:
        # Once per destination, not per request: its files are read here, before the session
        # opens, so that a file gone since the configuration was loaded (a worker restarted
        # after a crash reads them again) leaves no session behind.
        contexts = [
            self._tls_context(index, d) for index, d in enumerate(self._config.destinations)
        ]
        self._session = new_client_session(connections=self._config.worker.concurrency)
        for d, tls in zip(self._config.destinations, contexts, strict=True):
            assert d.url is not None  # noqa: S101 - config validation requires it for http
            self._by_destination[d.id] = HttpConnector(
                url=d.url,
                secret=d.secrets,
                timeout_s=d.effective_timeout_s(self._config.worker.max_attempt_s),
                session=self._session,
                headers=d.headers,
                tls=tls,
            )

        # Sending through a provider source (POST /api/v1/messages): "send:<source id>".
        send_timeout_s = min(DEFAULT_TIMEOUTS_S["whatsapp_send"], self._config.worker.max_attempt_s)
        for source in self._config.sources:
            if can_send(source):
                client = client_for(source, self._session, timeout_s=send_timeout_s)
                self._by_destination[send_destination(source.id)] = WhatsAppSendConnector(
                    client, source_id=source.id
                )

    @staticmethod
    def _tls_context(index: int, destination: DestinationConfig) -> ssl.SSLContext | None:
        try:
            return destination.tls_context()
        except TlsFileProblem as problem:  # changed since the configuration was loaded
            where = f"destinations[{index}].{problem.key}"
            raise ConfigError([ConfigIssue(where, problem.message)]) from None

    def get(self, destination_id: str) -> Connector | None:
        return self._by_destination.get(destination_id)

    async def close(self) -> None:
        for connector in self._by_destination.values():
            await connector.close()
        if self._session is not None:
            await self._session.close()
