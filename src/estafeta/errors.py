"""The exceptions of estafeta, under one root.

    EstafetaError
    ├── ConfigError            the configuration file is invalid (carries every issue found)
    ├── StoreError             the store could not do what was asked
    │   ├── StoreUnavailable   the store cannot be reached (connection refused, timeout)
    │   │   ├── StoreLoginRefused  the database refuses estafeta's login (role, password, db)
    │   │   └── StoreDeadlocked    PostgreSQL failed the transaction to break a deadlock
    │   ├── StoreRejected      the data breaks one of the schema's constraints
    │   └── LeaseRaced         a concurrent lease put one of the same ordering key in flight
    ├── FilterSyntaxError      a route filter expression does not parse
    ├── ServeError             the HTTP server could not start (its address in use …)
    ├── RedisKeyPrefixShared   another store's processes use this Redis key prefix
    └── HttpError              the only error that reaches an HTTP client: status, error, detail

Foreign exceptions (aiohttp, asyncpg, sqlite3 ...) are translated at the boundary where they
occur; nothing else leaks to a caller. Each subclass's docstring is its default message.
"""

from __future__ import annotations

from dataclasses import dataclass


class EstafetaError(Exception):
    """Something went wrong inside estafeta."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration: where (`routes[2].destinations[0]`) and why."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(EstafetaError):
    """The configuration is invalid; run `estafeta check-config FILE` to see every problem."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        problems = "1 problem" if len(issues) == 1 else f"{len(issues)} problems"
        super().__init__(f"invalid configuration ({problems}):\n{lines}")


class StoreError(EstafetaError):
    """The store could not complete the operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; check the database URL and that the server is running."""


class StoreLoginRefused(StoreUnavailable):
    """The database refuses estafeta's login: no such role or database, a wrong password.

    Unavailable to a running service (ingest spools, a worker waits for it to pass), but at
    start an operator's setting to correct (exit 2, not 3)."""


class StoreDeadlocked(StoreUnavailable):
    """PostgreSQL failed the transaction to break a deadlock: none of it was committed, and
    running it again passes (the other transaction has gone on)."""


class StoreRejected(StoreError):
    """The store refused the data: it breaks one of the schema's constraints."""


class LeaseRaced(StoreError):
    """Another lease put a delivery of the same ordering key in flight at the same moment;
    this lease took nothing (the next one goes on)."""


class FilterSyntaxError(EstafetaError):
    """The filter expression does not parse."""

    def __init__(self, message: str, position: int) -> None:
        self.position = position
        self.reason = message
        super().__init__(f"{message} (at character {position})")


class ServeError(EstafetaError):
    """The HTTP server could not start listening."""


class RedisKeyPrefixShared(EstafetaError):
    """Processes of another estafeta (another store) use this Redis key prefix: give each
    deployment that shares the Redis its own `[redis] key_prefix`."""


class HttpError(EstafetaError):
    """An error answered to an HTTP client as `{"error": ..., "detail": ...}`."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"{status} {error}: {detail}")
