"""The configuration's shape: one frozen pydantic model per TOML table.

Every model forbids unknown keys, so a typo (`urll = ...`) is an error rather than a silently
ignored setting; so is a key of another kind of source (`api_key` on a whatsapp_cloud one).
Checks that need one entry only (formats, ranges, the keys a `kind` needs and takes) live
here, so a `Config` built in code is checked too; checks across entries (duplicate ids,
unknown tenants and destinations) need the whole file and live in `loader.py`.

Secret-bearing fields are `repr=False` and database/Redis URLs are shown with their password
masked, so logging a configuration never leaks a credential.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import limits
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError

from estafeta.connectors.tls import TlsFileProblem, client_context
from estafeta.urls import outline

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

#: The pydantic error type of a problem raised by a model validator about one of its fields;
#: the loader appends `ctx["field"]` to the error's location (a model validator cannot).
FIELD_ERROR = "estafeta_field"
# worker.alert_no_workers_s's least: three of a running worker's announcements.
NO_WORKERS_MIN_S = 30.0
#: The longest lease, backoff, circuit and alert duration: 30 days, more than any of them
#: needs. Unbounded, `1e308` failed on round(inf) once turned into milliseconds, a retry due
#: after year 9999 could not be shown by the API, and one past 2**63 ms could not be stored.
MAX_DURATION_S = 30 * 86_400
INT64_MAX = 2**63 - 1
#: What every Redis key of a deployment starts with (`[redis] key_prefix`), unless set.
DEFAULT_REDIS_KEY_PREFIX = "estafeta:"
# Letters, digits and `_ . - :`, ending with `:` (keys read `<prefix>circuits`); short, as it
# starts every key of every tenant's rate-limit counters.
_REDIS_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{0,63}:")
#: The longest event type, from a body's `type`, the API or a source's `event_type`
#: (events.type is String(200)).
EVENT_TYPE_MAX_LENGTH = 200


def field_problem(message: str, field: str | int | None = None) -> PydanticCustomError:
    """An error whose message is shown as is, located at `field` of the model (or, from a
    field's validator, at item `field` of its list) when given."""
    ctx: dict[str, Any] = {"message": message}
    if field is not None:
        ctx["field"] = field
    return PydanticCustomError(FIELD_ERROR, "{message}", ctx)


def default_route_id(index: int) -> str:
    """The id of a route that has none: `route-{index}`, its 0-based place in `[[routes]]`."""
    return f"route-{index}"


def _check_id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"invalid id {value!r}: use 1 to 63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return value


# The documented form only: `limits` also reads multiples ("10/5 minutes"; a zero multiple
# as one: "10 per 0 minutes" is 10/minute), months and years, and any number of digits.
_RATE_LIMIT = re.compile(
    r"[0-9]{1,15}\s*(?:/|\s+per\s+)\s*(?:second|minute|hour|day)s?", re.IGNORECASE
)
#: The longest rate limit the store keeps (tenants.ingress_rate_limit is String(40)).
RATE_LIMIT_MAX_LENGTH = 40


def _check_rate_limit(value: str) -> str:
    try:
        parsed = limits.parse_many(value)
    except ValueError:
        parsed = []
    documented = len(value) <= RATE_LIMIT_MAX_LENGTH and _RATE_LIMIT.fullmatch(value.strip())
    if not documented or len(parsed) != 1 or parsed[0].amount < 1:
        raise ValueError(
            f"invalid rate limit {value!r}: write 'N/unit' or 'N per unit' with N >= 1 and "
            "unit second, minute, hour or day (e.g. '100/minute')"
        )
    return value


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # Enough to find the mistake, without what the URL may carry for credentials.
        shown = outline(value)
        where = f" {shown!r}" if shown else ""
        raise ValueError(f"invalid URL{where}: must start with http:// or https://")
    return value


def _check_base_url(value: str) -> str:
    """An http(s) URL that `/in/{source}` is appended to (`public_url`)."""
    _check_http_url(value)
    if "?" in value or "#" in value:
        # Appended after a query, the path became part of it: no signed URL matched.
        raise ValueError("must have no query (?…) or fragment (#…): /in/{source} is appended to it")
    return value


def _check_not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _check_whsec(value: str) -> str:
    """A Standard Webhooks secret; the value itself never goes into the message. Unpadded
    base64 is taken, as the `standardwebhooks` library that uses it takes it."""
    encoded = value.removeprefix("whsec_")
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        ok = value.startswith("whsec_") and bool(base64.b64decode(padded, validate=True))
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise ValueError("must be a Standard Webhooks secret: 'whsec_' followed by base64")
    return value


# The password runs to the last `@` before the query: Redis's client reads `:p@ss@host` as
# the password `p@ss` (urlsplit's rule), and a `/` in it must not end the mask either.
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@?#]*):[^?#]*@", re.I)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.I)  # postgresql://…?password=


def mask_url(url: str) -> str:
    """`scheme://user:secret@host` → `scheme://user:***@host` (and `?password=` → `***`),
    for reprs and logs."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))


Id = Annotated[str, AfterValidator(_check_id)]
RateLimit = Annotated[str, AfterValidator(_check_rate_limit)]
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
BaseUrl = Annotated[str, AfterValidator(_check_base_url)]
NonBlank = Annotated[str, AfterValidator(_check_not_blank)]


_NUMBER_TYPES: frozenset[Any] = frozenset({int, float, int | None, float | None})


class _Model(BaseModel):
    """Frozen and strict about keys: a misspelt key is an error, never ignored. TOML's `inf`
    and `nan` are refused: no duration, limit or ratio means them, and `int(inf)` fails."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax mode (kept so that "${N}" gives a number) would read `priority = true` as 1.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in _NUMBER_TYPES:
            raise ValueError("must be a number, not true or false")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul_characters(cls, value: Any) -> Any:
        # TOML writes one as "\u0000", but no setting means it: PostgreSQL's text refuses it
        # (tenants, sources, destinations and routes are copied into the store at start) and
        # a path holding one crashes. A table's strings are checked by its own model.
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            raise ValueError("must not contain a NUL character (\\u0000)")
        return value

    @field_validator("*")
    @classmethod
    def _no_integers_beyond_64_bits(cls, value: Any) -> Any:
        # TOML's integers are 64-bit, but tomllib reads any length: a longer count failed
        # once it met a float (`alert_queue_depth * 0.9`). Every count has its least already.
        if type(value) is int and value > INT64_MAX:
            raise ValueError(f"must be at most {INT64_MAX} (a 64-bit integer)")
        return value


def check_address(value: str) -> str:
    """A HOST:PORT to listen on (`server.listen`, `worker.metrics_listen`, and the commands'
    options that override them); port 0 means any free port."""
    host, _, port = value.rpartition(":")
    # isascii: `isdigit` is also true of '²', which int() refuses.
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError(f"invalid address {value!r}: write HOST:PORT, e.g. '0.0.0.0:8080'")
    try:  # as the resolver will: an empty label, one past 63 characters, a lone surrogate
        host.strip("[]").encode("idna")
    except UnicodeError:
        raise ValueError(f"invalid address {value!r}: the host is not a valid name") from None
    return value


def split_listen(listen: str) -> tuple[str, int]:
    """The host (brackets of an IPv6 address removed) and port of a checked address."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def joined_listen(host: str, port: int) -> str:
    """HOST:PORT as an address is written (an IPv6 host in brackets): split_listen's inverse,
    for the addresses a server bound."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServerConfig(_Model):
    """The HTTP server: where it listens and how much it reads."""

    listen: str = "127.0.0.1:8080"
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    public_url: BaseUrl | None = None
    # More requests at once than this are answered 503: memory stays bounded under any load.
    max_concurrent_requests: int = Field(default=4096, ge=16)
    # A client that takes longer to send a request, or to take an answer, is let go: each
    # connection counts against max_concurrent_requests while it is open.
    client_timeout_s: float = Field(default=30, gt=0, le=300)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return check_address(value)


#: What `estafeta.store.engine_url` accepts.
_DATABASE_SCHEMES = ("sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg")


class StorageConfig(_Model):
    """The store (SQLite or PostgreSQL) and the spool used while it is unreachable."""

    url: str = "sqlite:///./estafeta.db"
    spool_dir: NonBlank = "./estafeta-spool"
    # Past this many bytes of spooled events, ingress answers 503 rather than accept what
    # it could not keep.
    spool_max_bytes: int = Field(default=1024**3, gt=0)
    # A request whose events the store has not committed after this long is spooled and
    # answered: a hung database must not hold webhooks past the provider's patience
    # (Twilio hangs up at 15 s). At most 30 s: the driver's own timeouts answer by then.
    spool_after_s: float = Field(default=5, gt=0, le=30)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(
                f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH "
                "or postgresql://USER@HOST/DB"
            )
        if scheme.startswith("postgres"):
            _check_postgres_netloc(value)
            _check_postgres_query(parts.query)
        elif parts.netloc:  # `sqlite://./x.db`: a slash short, `.` read as a host
            raise ValueError("a SQLite URL has no host: write sqlite:///PATH")
        elif parts.path in ("", "/", "/:memory:"):
            # An in-memory database forgets every event at exit: never what "durable" means.
            raise ValueError("a SQLite URL needs a file: write sqlite:///PATH")
        elif parts.query:
            # The driver drops it (`?mode=ro` then wrote), or with `?uri=true` opens the file
            # past the checks and the private mode of store/sqlite.py.
            raise ValueError(
                f"a SQLite URL takes no query ('?{parts.query}'): write sqlite:///PATH"
            )
        return value

    def __repr_args__(self) -> Any:
        yield "url", mask_url(self.url)
        yield "spool_dir", self.spool_dir


#: Query parameters of a PostgreSQL URL: those the driver (asyncpg, through SQLAlchemy) takes
#: as written, and libpq's that store/postgres_connect.py translates for it. Any other would
#: reach asyncpg.connect() as an unknown keyword, or a string where it wants a number.
POSTGRES_QUERY_KEYS = (
    "sslmode",
    "ssl",
    "host",  # e.g. a Unix socket's directory: postgresql:///estafeta?host=/var/run/postgresql
    "port",
    "user",
    "password",
    "database",
    "passfile",
    "target_session_attrs",
    "application_name",
    "options",
    "connect_timeout",
    "statement_cache_size",
)
POSTGRES_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_PORT_RULE = "invalid database URL: the port must be a number 0-65535"


def _check_port(port: str | None) -> None:
    """Raises for a port that is not a number 0-65535 (None: none given)."""
    if port is not None and not (port.isascii() and port.isdigit() and int(port) < 65536):
        raise ValueError(_PORT_RULE)


def _check_postgres_netloc(url: str) -> None:
    """The user, password and hosts of a PostgreSQL URL: libpq's host list (`h1,h2:5433`)
    included, and a `@`, `/`, `?` or `#` of a password written as it is refused by name
    (read as the host's, it failed as a DNS error or, worse, quoted the password's rest as
    a parameter's name)."""
    parts = urlsplit(url)
    # An `@` in the query is a password's only outside a known parameter's value: libpq
    # takes `?password=p@ss` or `?user=admin@server` as written.
    misplaced = any(
        "@" in item and unquote(item.partition("=")[0]) not in POSTGRES_QUERY_KEYS
        for item in parts.query.split("&")
    )
    if parts.netloc.count("@") > 1 or "@" in _after_netloc(url) or misplaced or parts.fragment:
        raise ValueError(
            "invalid database URL: write a '/', '?', '#' or '@' of its user or password"
            " percent-encoded (%2F, %3F, %23, %40)"
        )
    hosts = parts.netloc.rpartition("@")[2]
    if "," in hosts and "[" in hosts:
        raise ValueError("invalid database URL: a host list cannot hold an IPv6 address")
    for host in hosts.split(","):
        if not host.startswith("["):
            _check_port(host.partition(":")[2] or None)
        elif "]:" in host:
            _check_port(host.rpartition("]:")[2])


def _check_postgres_query(query: str) -> None:
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in POSTGRES_QUERY_KEYS:
            raise ValueError(
                f"unsupported database URL parameter {key!r} (supported: "
                f"{', '.join(POSTGRES_QUERY_KEYS)})"
            )
        if key in ("sslmode", "ssl") and value not in POSTGRES_SSL_MODES:
            raise ValueError(f"invalid {key} {value!r}: use {', '.join(POSTGRES_SSL_MODES)}")
        if key == "port":
            for port in value.split(","):
                _check_port(port)
        if key == "statement_cache_size" and not (value.isascii() and value.isdigit()):
            raise ValueError(
                f"invalid statement_cache_size {value!r}: a number of statements, 0 behind"
                " PgBouncer in transaction mode"
            )
        if key == "connect_timeout" and not (
            value.isascii() and value.isdigit() and int(value) > 0
        ):
            raise ValueError(f"invalid connect_timeout {value!r}: a whole number of seconds > 0")


class RedisConfig(_Model):
    """Optional shared cache, rate-limit and circuit state; without it they live in memory."""

    url: str | None = None
    # Deployments that share one Redis database (staging and production, several customers')
    # each need their own: ids such as `crm` repeat across them (redis_prefix.py).
    key_prefix: str = DEFAULT_REDIS_KEY_PREFIX

    @field_validator("key_prefix")
    @classmethod
    def _check_key_prefix(cls, value: str) -> str:
        if not _REDIS_KEY_PREFIX.fullmatch(value):
            raise ValueError(
                f"invalid key prefix {value!r}: use 1 to 64 letters, digits, '_', '.', '-' or"
                " ':', ending with ':' (e.g. \"estafeta-staging:\")"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("invalid Redis URL: must start with redis://, rediss:// or unix://")
        if "@" in _after_netloc(value):
            # `redis://:pa/ss@host`: urlsplit ends the host at the `/`, and the error below
            # would quote the password's first part as the port.
            raise ValueError(
                "invalid Redis URL: write a '/', '?', '#' or '@' of its user or password"
                " percent-encoded (%2F, %3F, %23, %40)"
            )
        parts = urlsplit(value)
        database = unquote(parts.path).replace("/", "")  # as redis-py reads it
        named_db = any(key == "db" for key, _ in parse_qsl(parts.query))
        if parts.scheme != "unix" and not named_db and database and not database.isdecimal():
            # redis-py silently reads such a path as database 0, which another deployment
            # may be using (`/l` for `/1`). Not quoted: a password's part may end up there.
            raise ValueError("invalid Redis URL: its path must be a database number (/0, /1 …)")
        # What the clients will build from it, built now (no connection is made): a bad port
        # or an unknown parameter would otherwise fail only once running, in every task that
        # touches Redis.
        try:
            connection = ConnectionPool.from_url(value).make_connection()  # type: ignore[no-untyped-call]
            # Looked up only as the first command is encoded: a LookupError in every task.
            codecs.lookup(connection.encoder.encoding)
            codecs.lookup_error(connection.encoder.encoding_errors)
        except TypeError:  # an unknown query parameter, passed on as a keyword
            raise ValueError("invalid Redis URL: unsupported parameter in its query") from None
        # A port that is not a number, a bad db or option; RedisError: a value the client
        # refuses as it makes the connection (`ssl_cert_reqs`, `protocol`); LookupError: an
        # `encoding` or `encoding_errors` Python does not know.
        except (ValueError, RedisError, LookupError) as exc:
            raise ValueError(f"invalid Redis URL: {exc}") from None
        return value

    def __repr_args__(self) -> Any:
        yield "url", None if self.url is None else mask_url(self.url)
        yield "key_prefix", self.key_prefix


def _after_netloc(url: str) -> str:
    """What follows a URL's `scheme://netloc`, up to its query or fragment."""
    parts = urlsplit(url)
    rest = url.split("://", 1)[-1][len(parts.netloc) :]
    return re.split(r"[?#]", rest, maxsplit=1)[0]


class WorkerConfig(_Model):
    """Delivery workers: how many sends at once, how they lease and how they stop."""

    # Sends at once per process: a send mostly waits on the network, and 256 measured 37 %
    # more deliveries/s than 64 at the same CPU (bench/, end to end).
    concurrency: int = Field(default=256, ge=1, le=10_000)
    batch_size: int = Field(default=100, ge=1, le=1000)
    lease_s: float = Field(default=60, gt=0, le=MAX_DURATION_S)
    # Bounded, so that a typo (3600 for 3.6) is refused: an idle worker looks for due retries
    # and CLI replays at least once a minute, rescues expired leases at least every 5 minutes,
    # and waits on a stop no longer than the longest attempt (max_attempt_s's bound).
    poll_interval_s: float = Field(default=0.2, gt=0, le=60)
    shutdown_grace_s: float = Field(default=10, ge=0, le=600)
    rescue_interval_s: float = Field(default=5, gt=0, le=300)
    # No attempt of any destination may take longer than this, whatever its timeout_s.
    max_attempt_s: float = Field(default=120, gt=0, le=600)
    # The queue_backlog alert fires when this many deliveries are pending.
    alert_queue_depth: int = Field(default=10_000, ge=1)
    # The dead_letters alert fires when this many deliveries are dead.
    alert_dead_letters: int = Field(default=1, ge=1)
    # The destination_down alert fires when a destination's circuit has not closed for this long.
    alert_destination_down_s: float = Field(default=300, gt=0, le=MAX_DURATION_S)
    # The no_workers alert fires when deliveries wait and no process has delivered for this long.
    alert_no_workers_s: float = Field(default=120, le=MAX_DURATION_S)
    # The webhooks_refused alert fires when a source's webhooks have been refused, none
    # accepted meanwhile, for this long.
    alert_webhooks_refused_s: float = Field(default=300, gt=0, le=MAX_DURATION_S)
    # The store_down alert fires when the store has not answered `serve`'s reads for this long.
    alert_store_down_s: float = Field(default=60, gt=0, le=MAX_DURATION_S)
    # The redis_down alert fires when the configured Redis has not answered for this long.
    alert_redis_down_s: float = Field(default=60, gt=0, le=MAX_DURATION_S)
    # Where `estafeta worker` serves its own /metrics and /health (none when unset); `serve`
    # has them on server.listen.
    metrics_listen: str | None = None

    @field_validator("alert_no_workers_s")
    @classmethod
    def _check_alert_no_workers_s(cls, value: float) -> float:
        # A running worker announces itself every 10 s (delivery/presence.py), and a late
        # announcement (a slow store) must not read as a worker gone.
        if not value >= NO_WORKERS_MIN_S:  # NaN too
            raise ValueError(
                f"must be at least {NO_WORKERS_MIN_S:g} s: a running worker is seen only once"
                " every 10 s"
            )
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str | None) -> str | None:
        return value if value is None else check_address(value)


def checked_secret(value: str | None) -> str | None:
    """A secret a request must carry, unless it cannot be matched. Spaces are a secret anyone
    guesses (`?token=+`); spaces around one, a secret file's newline, make every genuine
    request fail its check (HTTP strips them from a header). The value is never shown."""
    if not value:
        return value
    if not value.strip():
        raise ValueError("must not be blank: a secret of whitespace is as guessable as none")
    if value != value.strip():
        raise ValueError(
            "must not start or end with whitespace (a secret file's newline?): "
            "no genuine request would match it"
        )
    return value


def header_secret(value: str | None) -> str | None:
    """A secret a request carries in its `Authorization` header (the admin key, a generic
    source's `api_key`): a `checked_secret` of ASCII only. Headers reach the server as
    Latin-1 and the key is compared as UTF-8, so one with an accent answered 401 to every
    request that carried it."""
    checked = checked_secret(value)
    if checked and not checked.isascii():
        raise ValueError(
            "must be ASCII: an HTTP header carries no other characters reliably, so no "
            "request would match it"
        )
    return checked


#: A secret that may be rotated, as written: one string, or a list of them while the old one
#: is still in use (the first is the current one). Read through `secrets_of` or `current`.
Secrets = str | tuple[str, ...]


def _secrets_shape(value: Any) -> Any:
    """A string or a non-empty list of strings; said here, or pydantic's union of the two
    would report each of its members' complaints."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list | tuple):
        raise ValueError("must be a string or a list of strings (old and new, while rotating)")
    if not value:
        raise ValueError("must not be empty: write at least one secret")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise field_problem("must be a string", index)
        if not item:  # an empty `${VAR}` would silently leave one secret fewer
            raise field_problem(
                "must not be empty (an unset or empty environment variable?)", index
            )
    return tuple(value)


RotatableSecret = Annotated[Secrets, BeforeValidator(_secrets_shape)]


def secrets_of(value: Secrets | None) -> tuple[str, ...]:
    """Every secret of a rotatable key, current first; () when it is not set."""
    if not value:
        return ()
    return (value,) if isinstance(value, str) else value


def current(value: Secrets | None) -> str | None:
    """The current (first) secret of a rotatable key: the one to send or sign with first."""
    found = secrets_of(value)
    return found[0] if found else None


def check_each(value: Secrets | None, check: Callable[[str], object]) -> None:
    """Run `check` on every secret of a rotatable key; one that fails it, or repeats an
    earlier one, is reported at its place in the list (the value is never shown)."""
    if value is None or isinstance(value, str):
        if value is not None:
            check(value)
        return
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        try:
            check(item)
        except ValueError as exc:
            raise field_problem(str(exc), index) from None
        if item in seen:
            # Likely `["${NEW}", "${NEW}"]` meant with OLD: the old secret would be refused.
            raise field_problem(
                f"the same secret as item {seen[item]}: list each secret once", index
            )
        seen[item] = index


class SecurityConfig(_Model):
    """The admin API key and the key that encrypts stored third-party credentials."""

    admin_key: str | None = Field(default=None, repr=False)
    master_key: str | None = Field(default=None, repr=False)

    @field_validator("admin_key")
    @classmethod
    def _check_admin_key(cls, value: str | None) -> str | None:
        # Sent as `Authorization: Bearer <admin_key>`: one with whitespace around it, from a
        # secret file through `${VAR}`, answered 401 to every request of the operator; so
        # did one with a character beyond ASCII (headers arrive as Latin-1).
        return header_secret(value)


class TenantConfig(_Model):
    """One business served by this hub; every other entry belongs to one."""

    id: Id
    name: str = ""
    ingress_rate_limit: RateLimit = "100/minute"


SourceKind = Literal["generic", "whatsapp_cloud", "twilio", "zapi", "sendpulse"]

#: The keys every source has, whatever its kind.
SOURCE_COMMON_KEYS = ("id", "tenant", "kind")
#: What every kind that sends also takes: where its provider's API is, and its send policy.
SEND_SETTINGS = ("api_base", "send_rate_limit", "send_max_attempts")


@dataclass(frozen=True)
class SourceKeys:
    """The keys of one kind of source besides `SOURCE_COMMON_KEYS`, by their TOML names."""

    #: What verifies the requests the provider sends to `/in/{id}`.
    inbound: tuple[str, ...]
    #: The inbound key the kind cannot verify without (a generic source needs `secret` or
    #: `api_key`, checked on its own).
    needs: str | None = None
    #: What a send through the source needs, all of them (`POST /api/v1/messages`).
    sends_with: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key the kind takes, in the order an operator is told them; any other is an
        error where it is written, never a setting silently ignored."""
        sending = (*self.sends_with, *SEND_SETTINGS) if self.sends_with else ()
        return tuple(dict.fromkeys((*self.inbound, *sending)))


#: The one table of which keys each kind of source takes (DESIGN §3.2, "Keys of a source, by
#: kind"): the checks below and the senders (`OUTBOUND_KEYS`) read it. A new field of
#: `SourceConfig` belongs in it, or in `SOURCE_COMMON_KEYS`: any other key is refused.
SOURCE_KEYS: dict[str, SourceKeys] = {
    "generic": SourceKeys(inbound=("secret", "api_key", "event_type")),
    "whatsapp_cloud": SourceKeys(
        inbound=("app_secret", "verify_token"),
        needs="app_secret",
        sends_with=("access_token", "phone_number_id"),
    ),
    "twilio": SourceKeys(
        # `public_url`: the URL Twilio calls and signs, and where its status callbacks go.
        inbound=("auth_token", "public_url"),
        needs="auth_token",
        sends_with=("account_sid", "auth_token", "from"),
    ),
    "zapi": SourceKeys(
        inbound=("token",),
        needs="token",
        sends_with=("instance_id", "instance_token", "client_token"),
    ),
    "sendpulse": SourceKeys(
        inbound=("token",), needs="token", sends_with=("client_id", "client_secret", "bot_id")
    ),
}

#: The keys that prove who sends to `/in/{id}` (`secret`, a generic source's Standard
#: Webhooks key, is checked as base64, which takes no whitespace).
INBOUND_SECRETS = ("api_key", "app_secret", "verify_token", "auth_token", "token")

#: The other keys a send takes, by field name (`from` is `from_`): ids, numbers and
#: credentials that go into the provider's URL, headers or form as they are written.
OUTBOUND_VALUES = tuple(
    dict.fromkeys(
        "from_" if key == "from" else key
        for keys in SOURCE_KEYS.values()
        for key in keys.sends_with
        if key not in INBOUND_SECRETS
    )
)

#: Kinds whose inbound signature covers the URL the provider called (`public_url`).
PUBLIC_URL_KINDS = frozenset(kind for kind, k in SOURCE_KEYS.items() if "public_url" in k.keys)

#: The key naming a source's own number, of the kinds whose webhooks are routed by it
#: (ingress/endpoint.py: `owned`): a Meta app's or a Twilio account's one webhook URL may
#: carry the events of every number it has, another tenant's too.
ROUTING_NUMBER_KEYS = {"whatsapp_cloud": "phone_number_id", "twilio": "from"}


def routing_number(kind: str, value: str) -> str:
    """`value`, the kind's `ROUTING_NUMBER_KEYS` key, as the webhooks name the number: a
    Twilio `from` as `+<digits>` (`whatsapp:+55 11 4002-8922` → `+551140028922`), as the
    ingress writes a message's `To`."""
    if kind != "twilio":
        return value
    digits = value.removeprefix("whatsapp:").strip().removeprefix("+")
    for separator in " -().":
        digits = digits.replace(separator, "")
    return f"+{digits}" if digits.isascii() and digits.isdigit() else value


# The source id of events published through POST /api/v1/events: a configured source with
# this id would share their idempotency keys.
RESERVED_SOURCE_IDS = frozenset({"api"})


def source_key_missing(kind: str, values: Mapping[str, Any]) -> tuple[str | None, str] | None:
    """The key a source of `kind` cannot do without, if `values` (its keys by name, a raw
    table's or a model's) lack it: (the key, or None when either of two would do; why).
    "" is not set (an empty `${VAR}`). The loader asks it of the raw table too: the model
    checks it only once every other key of the source is valid, so a missing key was
    reported only at the check after the others had been fixed."""
    if kind == "generic":
        if values.get("secret") in (None, "") and values.get("api_key") in (None, ""):
            return None, "a generic source needs `secret` (Standard Webhooks) or `api_key`"
        return None
    needed = SOURCE_KEYS[kind].needs
    if needed and values.get(needed) in (None, ""):
        return needed, f"required for a {kind} source"
    return None


def outbound_keys_missing(
    kind: str, source_id: object, values: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """The outbound keys a source of `kind` lacks when it has part of them: (the key, why)
    for each. One with none of the keys only sending uses (a Twilio source's `auth_token`
    also verifies) only receives, which is fine. `values` by TOML name, a raw table's or
    the model's; "" is not set (an empty `${VAR}`). Asked of the raw table by the loader too,
    as `source_key_missing` is, so that every missing key is reported at once."""
    keys = SOURCE_KEYS[kind]
    given = [key for key in keys.sends_with if values.get(key) not in (None, "")]
    only_sending = [key for key in given if key not in keys.inbound]
    if not only_sending:
        return []
    who = f"source {source_id!r}" if isinstance(source_id, str) else "this source"
    why = (
        f"required to send through {who}, which sets {', '.join(only_sending)}: a {kind}"
        f" source sends with {', '.join(keys.sends_with)}"
    )
    # The key the kind needs anyway (Twilio's `auth_token`) is reported as that.
    return [(key, why) for key in keys.sends_with if key not in given and key != keys.needs]


class SourceConfig(_Model):
    """Where events come in (`/in/{id}`) and how their sender is verified (DESIGN §3.2)."""

    id: Id
    tenant: str
    kind: SourceKind

    # Sending through this source's provider (POST /api/v1/messages): its own rate limit
    # (WhatsApp Cloud allows about 80 messages/second per number) and attempts.
    send_rate_limit: RateLimit | None = None
    send_max_attempts: int = Field(default=8, ge=1, le=100)

    @field_validator("id")
    @classmethod
    def _check_not_reserved(cls, value: str) -> str:
        if value in RESERVED_SOURCE_IDS:
            raise ValueError(f"{value!r} is reserved for events published through the API")
        return value

    secret: RotatableSecret | None = Field(default=None, repr=False)
    api_key: RotatableSecret | None = Field(default=None, repr=False)
    event_type: str | None = None
    app_secret: RotatableSecret | None = Field(default=None, repr=False)
    verify_token: RotatableSecret | None = Field(default=None, repr=False)
    auth_token: RotatableSecret | None = Field(default=None, repr=False)
    public_url: BaseUrl | None = None
    token: RotatableSecret | None = Field(default=None, repr=False)
    access_token: str | None = Field(default=None, repr=False)
    phone_number_id: str | None = None
    api_base: HttpUrl | None = None
    account_sid: str | None = None
    from_: str | None = Field(default=None, alias="from")
    instance_id: str | None = None
    instance_token: str | None = Field(default=None, repr=False)
    client_token: str | None = Field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = Field(default=None, repr=False)
    bot_id: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _check_key_of_kind(cls, value: Any, info: ValidationInfo) -> Any:
        # A key of another kind would be silently ignored: `api_key` on a whatsapp_cloud
        # source protects nothing. Checked before the key's own checks (its value does not
        # matter where it does not belong), for the keys written only; `kind` is declared
        # before them, so it is known here unless it is itself invalid.
        field = cls.model_fields[info.field_name or ""]
        key = field.alias or info.field_name or ""
        kind = info.data.get("kind")
        takes = SOURCE_KEYS[kind].keys if kind in SOURCE_KEYS else None
        if value is None or takes is None or key in SOURCE_COMMON_KEYS or key in takes:
            return value
        raise ValueError(f"not a key of a {kind} source (it takes {', '.join(takes)})")

    @field_validator("event_type")
    @classmethod
    def _check_event_type(cls, value: str | None) -> str | None:
        # Stored as each event's type: a longer one failed every webhook without a "type".
        # An empty one is no type an event can have, nor "not set": it was taken as such.
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        if value is not None and len(value) > EVENT_TYPE_MAX_LENGTH:
            raise ValueError(
                f"must be at most {EVENT_TYPE_MAX_LENGTH} characters, as an event's type"
            )
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: Secrets | None, info: ValidationInfo) -> Secrets | None:
        if info.data.get("kind") == "generic":
            check_each(value, _check_whsec)
        return value

    @field_validator(*INBOUND_SECRETS)
    @classmethod
    def _check_inbound_secret(cls, value: Secrets | None, info: ValidationInfo) -> Secrets | None:
        # "" is "not set" (an empty `${VAR}`): refused where the kind needs the key. Only
        # `api_key` travels in a header; the others are HMAC keys or percent-decoded query
        # values, which carry any character.
        check_each(value, header_secret if info.field_name == "api_key" else checked_secret)
        return value

    @field_validator(*OUTBOUND_VALUES)
    @classmethod
    def _check_outbound_value(cls, value: str | None) -> str | None:
        # A secret file's newline after `access_token` failed every send for good, at send
        # time (aiohttp refuses a header holding one: `invalid_destination`); a space around
        # an id or a number had the provider refuse it. The value is never shown.
        if value and value != value.strip():
            raise ValueError(
                "must not start or end with whitespace (a secret file's newline?): the "
                "provider would refuse every send through this source"
            )
        return value

    @model_validator(mode="after")
    def _check_kind_keys(self) -> SourceConfig:
        missing = source_key_missing(self.kind, vars(self))
        if missing is not None:
            raise field_problem(missing[1], missing[0])
        # Loaded, such a source answered every send `400 source_cannot_send`.
        sends_with = {key: self.value_of(key) for key in SOURCE_KEYS[self.kind].sends_with}
        for key, why in outbound_keys_missing(self.kind, self.id, sends_with)[:1]:
            raise field_problem(why, key)
        own_path = f"/in/{self.id}"
        if self.public_url and self.public_url.split("?")[0].rstrip("/").endswith(own_path):
            # The URL is the base: the signed URL would be `…/in/{id}/in/{id}`, never Twilio's.
            raise field_problem(
                f"is where the hub is reached, without {own_path} (it is appended)", "public_url"
            )
        return self

    def __repr_args__(self) -> Any:
        # Twilio takes `https://user:password@host` webhook URLs (HTTP basic auth).
        for name, value in super().__repr_args__():
            masked = name in ("public_url", "api_base") and isinstance(value, str)
            yield name, mask_url(value) if masked else value

    def value_of(self, key: str) -> Any:
        """The value of a key by its TOML name (`from` is the attribute `from_`); of a
        rotatable secret, the current one (a Twilio source sends with its first `auth_token`)."""
        value = getattr(self, "from_" if key == "from" else key)
        return current(value) if isinstance(value, tuple) else value

    def own_number(self) -> str | None:
        """The number whose webhooks are this source's (`routing_number`), if it routes by one."""
        key = ROUTING_NUMBER_KEYS.get(self.kind)
        value = self.value_of(key) if key else None
        return routing_number(self.kind, value) if value else None

    def secrets_of(self, key: str) -> tuple[str, ...]:
        """Every secret a request to `/in/{id}` may be verified with by `key` (an inbound
        key of `INBOUND_SECRETS` or `secret`), current first; () when it is not set."""
        value: Secrets | None = getattr(self, key)
        return secrets_of(value)


class BackoffConfig(_Model):
    """Delay before retry n: min(max_s, base_s * factor**(n-1)), spread by ±jitter."""

    base_s: float = Field(default=1, gt=0, le=MAX_DURATION_S)
    factor: float = Field(default=2, ge=1)
    max_s: float = Field(default=3600, gt=0, le=MAX_DURATION_S)
    jitter: float = Field(default=0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _check_order(self) -> BackoffConfig:
        if self.max_s < self.base_s:
            raise field_problem(f"must be at least base_s ({self.base_s:g})", "max_s")
        return self


class CircuitConfig(_Model):
    """Open the circuit after `failures` consecutive failures, or, with `failure_ratio`, when
    that share of at least `min_requests` results within `window_s` failed; probe again
    after `reset_s`."""

    failures: int = Field(default=5, ge=1)
    reset_s: float = Field(default=30, gt=0, le=MAX_DURATION_S)
    failure_ratio: float | None = Field(default=None, gt=0, le=1)
    window_s: float = Field(default=60, gt=0, le=MAX_DURATION_S)
    min_requests: int = Field(default=10, ge=1)


DestinationKind = Literal["http", "airtable", "google_calendar", "smtp", "whatsapp_send"]


# Per-attempt timeouts by destination kind, when a destination sets none: an HTTP receiver may
# do real work before it answers; a messaging API or a calendar answers fast or not at all.
DEFAULT_TIMEOUTS_S: dict[str, float] = {
    "http": 30.0,
    "whatsapp_send": 10.0,
    "google_calendar": 15.0,
    "airtable": 15.0,
    "smtp": 30.0,
}


# Headers estafeta sets on every outbound request: a destination's `headers` cannot replace
# them, so its config can never break the signature or the idempotency key.
OWN_HEADERS = (
    "content-type",
    "user-agent",
    "accept-encoding",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
)
# Headers that say how the body is framed or encoded. Named in a destination's `headers`,
# aiohttp sent them as given over the body it framed itself: the receiver read fewer bytes
# than were signed, waited for more, or refused the request, on every delivery.
BODY_HEADERS = ("content-length", "transfer-encoding", "content-encoding")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110's token
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but horizontal tab


def destination_key_missing(kind: str, values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The key a destination of `kind` cannot do without, if `values` lack it: (the key,
    why); asked of the raw table by the loader too, as `source_key_missing` is."""
    if kind == "http" and values.get("url") is None:
        return "url", "required for an http destination"
    return None


def header_problems(headers: Mapping[Any, Any]) -> list[str]:
    """What is wrong with each of a destination's `headers`, in order; asked of the raw
    table by the loader too (names and values that are not strings are reported by
    validation), so that every header at fault is reported at once."""
    # Found only at send time, each of these made every delivery a permanent failure
    # (or, for estafeta's own headers, was silently left out).
    problems: list[str] = []
    seen: dict[str, str] = {}
    for name, text in headers.items():
        if not isinstance(name, str):
            continue
        if not _HEADER_NAME.fullmatch(name):
            problems.append(
                f"header name {name!r} is not an HTTP token: letters, digits and "
                "!#$%&'*+-.^_`|~ only"
            )
        elif name.lower() in OWN_HEADERS:
            problems.append(f"header {name!r} is set by estafeta and cannot be replaced")
        elif name.lower() in BODY_HEADERS:
            problems.append(
                f"header {name!r} describes the body, which estafeta sends as it signed "
                "it: it cannot be set"
            )
        # Names are sent lowercased (connectors/http.py): two spellings would silently
        # become one header, with one of the two values.
        elif (first := seen.setdefault(name.lower(), name)) != name:
            problems.append(
                f"header {name!r} is also written as {first!r}: header names ignore case, keep one"
            )
        elif isinstance(text, str) and _HEADER_CONTROL.search(text):
            # The value is not echoed: often a credential.
            problems.append(f"header {name!r}: its value holds a control character (CR, LF, NUL …)")
    return problems


class DestinationConfig(_Model):
    """Where deliveries go, with their retry, rate-limit and circuit-breaker policy."""

    id: Id
    tenant: str
    kind: DestinationKind = "http"
    url: str | None = None
    secret: RotatableSecret | None = Field(default=None, repr=False)
    # None: the kind's default (DEFAULT_TIMEOUTS_S); see `effective_timeout_s`.
    timeout_s: float | None = Field(default=None, gt=0, le=300)
    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff: BackoffConfig = BackoffConfig()
    rate_limit: RateLimit | None = None
    # At most this many sends to it at once per worker process (None: no cap of its own;
    # the lease still gives free slots first to the destinations with the fewest in flight).
    max_in_flight: int | None = Field(default=None, ge=1, le=10_000)
    circuit: CircuitConfig = CircuitConfig()
    # Hidden from repr: headers often carry credentials (`Authorization = "Bearer ..."`).
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    # TLS to a system with a private CA or a self-signed certificate (`tls_ca_file`: trust
    # only these), or one that asks for a client certificate (mutual TLS): PEM files, read
    # when the configuration is loaded and again once when the connectors start.
    tls_ca_file: NonBlank | None = None
    tls_client_cert: NonBlank | None = None
    tls_client_key: NonBlank | None = None
    tls_client_key_password: str | None = Field(default=None, repr=False)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kind") == "http":
            _check_http_url(value)
        return value

    def __repr_args__(self) -> Any:
        # A hook URL's credentials can be its user and password, its path (a Make or Zapier
        # hook's token is the path) or its query: shown as its outline, as in excerpts.
        for name, value in super().__repr_args__():
            yield name, outline(value) if name == "url" and isinstance(value, str) else value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        # The first problem only: a validator raises one; the loader reports them all.
        for problem in header_problems(value)[:1]:
            raise ValueError(problem)
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: Secrets | None, info: ValidationInfo) -> Secrets | None:
        if info.data.get("kind") == "http":
            check_each(value, _check_whsec)
        return value

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets each delivery is signed with, current first (one signature each)."""
        return secrets_of(self.secret)

    @model_validator(mode="after")
    def _check_kind_keys(self) -> DestinationConfig:
        missing = destination_key_missing(self.kind, vars(self))
        if missing is not None:
            raise field_problem(missing[1], missing[0])
        named = any(name.lower() == "authorization" for name in self.headers)
        if named and self.url is not None and urlsplit(self.url).username is not None:
            # aiohttp refuses the two together: every delivery failed for good, at send time.
            raise field_problem(
                "an Authorization header and a user in `url` (sent as Basic authorization) "
                "cannot go together: keep one",
                "headers",
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> DestinationConfig:
        given = [
            key
            for key in ("tls_ca_file", "tls_client_cert", "tls_client_key")
            if getattr(self, key) is not None
        ]
        if self.tls_client_key_password is not None and self.tls_client_cert is None:
            raise field_problem(
                "there is no tls_client_cert whose key it opens", "tls_client_key_password"
            )
        if not given:
            return self
        if self.tls_client_key is not None and self.tls_client_cert is None:
            raise field_problem(
                "needs tls_client_cert, the certificate of this key", "tls_client_key"
            )
        if self.kind == "http" and self.url is not None and urlsplit(self.url).scheme != "https":
            # Said, not ignored: nothing would be verified or presented.
            raise field_problem("the url is not https://: nothing is sent over TLS", given[0])
        try:
            self.tls_context()
        except TlsFileProblem as problem:
            raise field_problem(problem.message, problem.key) from None
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The destination's own TLS context, its files read now; None when it sets neither a
        CA nor a client certificate (aiohttp's default context then verifies). Raises
        `TlsFileProblem` for a file that cannot be used."""
        if self.tls_ca_file is None and self.tls_client_cert is None:
            return None
        return client_context(
            ca_file=self.tls_ca_file,
            client_cert=self.tls_client_cert,
            client_key=self.tls_client_key,
            client_key_password=self.tls_client_key_password,
        )

    def effective_timeout_s(self, ceiling_s: float) -> float:
        """The timeout of one attempt: `timeout_s`, else the kind's default, never above
        the workers' `max_attempt_s` ceiling."""
        chosen = self.timeout_s if self.timeout_s is not None else DEFAULT_TIMEOUTS_S[self.kind]
        return min(chosen, ceiling_s)


class RouteConfig(_Model):
    """Which events (type globs, optional filter) go to which destinations, how urgently."""

    id: Id | None = None
    tenant: str
    events: list[NonBlank] = Field(min_length=1)
    filter: str | None = None
    destinations: list[NonBlank] = Field(min_length=1)
    priority: int = Field(default=2, ge=0, le=4)
    ordering_key: str | None = None

    @field_validator("filter")
    @classmethod
    def _check_filter(cls, value: str | None) -> str | None:
        if value is None:
            return value
        # Imported here: the filter language is its own module and must not be needed to
        # import the configuration models.
        from estafeta.errors import FilterSyntaxError
        from estafeta.routing.filter import parse, paths, unknown_field

        try:
            parsed = parse(value)
        except FilterSyntaxError as exc:
            raise ValueError(f"{exc.reason} (at character {exc.position})") from None
        for path in paths(parsed.ast):  # else the filter would silently never match
            problem = unknown_field(path)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("ordering_key")
    @classmethod
    def _check_ordering_key(cls, value: str | None) -> str | None:
        # Looked up per event, a path with an empty or spaced part would find nothing and
        # every event would silently get no key; any other JSON key is allowed.
        if value is not None and not all(p and not re.search(r"\s", p) for p in value.split(".")):
            raise ValueError(
                f"invalid path {value!r}: write keys joined by '.', e.g. 'data.conversation_id'"
            )
        from estafeta.routing.filter import unknown_field  # see _check_filter

        problem = None if value is None else unknown_field(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class Config(_Model):
    """The whole configuration file. Use `load_config` to also check cross references.

    Routes without an `id` get `default_route_id(index)` (`route-0`, `route-1`, ...) during
    validation, so `route.id` is never None for a route of a `Config`.
    """

    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    redis: RedisConfig = RedisConfig()
    worker: WorkerConfig = WorkerConfig()
    security: SecurityConfig = SecurityConfig()
    tenants: list[TenantConfig] = Field(default_factory=list)
    sources: list[SourceConfig] = Field(default_factory=list)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)

    _tenants: dict[str, TenantConfig] = PrivateAttr(default_factory=dict)
    _sources: dict[str, SourceConfig] = PrivateAttr(default_factory=dict)
    _destinations: dict[str, DestinationConfig] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_routes(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
            return data
        routes: list[Any] = []
        for index, route in enumerate(data["routes"]):
            if isinstance(route, dict) and route.get("id") is None:
                route = {**route, "id": default_route_id(index)}
            elif isinstance(route, RouteConfig) and route.id is None:
                route = route.model_copy(update={"id": default_route_id(index)})
            routes.append(route)
        return {**data, "routes": routes}

    @model_validator(mode="before")
    @classmethod
    def _default_public_urls(cls, data: Any) -> Any:
        """A Twilio source without its own `public_url` takes the server's: the URL Twilio
        calls (and signs) is where the internet reaches this server."""
        if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
            return data
        server = data.get("server")
        public_url = (
            server.get("public_url")
            if isinstance(server, dict)
            else getattr(server, "public_url", None)
        )
        if not isinstance(public_url, str):
            return data
        try:
            _check_base_url(public_url)
        except ValueError:
            return data  # reported where it was written: at server.public_url
        sources = [
            {**source, "public_url": public_url}
            if isinstance(source, dict)
            and source.get("kind") in PUBLIC_URL_KINDS
            and source.get("public_url") is None
            else source
            for source in data["sources"]
        ]
        return {**data, "sources": sources}

    def model_post_init(self, context: Any, /) -> None:
        """Index entries by id once; with duplicates (only possible in code) the first wins."""
        for tenant in self.tenants:
            self._tenants.setdefault(tenant.id, tenant)
        for source in self.sources:
            self._sources.setdefault(source.id, source)
        for destination in self.destinations:
            self._destinations.setdefault(destination.id, destination)

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        """The tenant with this id, or None."""
        return self._tenants.get(tenant_id)

    def source(self, source_id: str) -> SourceConfig | None:
        """The source with this id (the `{source}` of `/in/{source}`), or None."""
        return self._sources.get(source_id)

    def destination(self, destination_id: str) -> DestinationConfig | None:
        """The destination with this id, or None."""
        return self._destinations.get(destination_id)

    def route_ids(self) -> list[str]:
        """Every route's id, in file order; a route without one is `route-{index}`."""
        return [route.id or default_route_id(i) for i, route in enumerate(self.routes)]
