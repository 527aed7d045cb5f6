"""The configuration as an operator meets it: what loads, and the exact error text when not."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from standardwebhooks import Webhook

from estafeta.config import (
    BackoffConfig,
    CircuitConfig,
    Config,
    DestinationConfig,
    RedisConfig,
    RouteConfig,
    SecurityConfig,
    ServerConfig,
    SourceConfig,
    StorageConfig,
    TenantConfig,
    WorkerConfig,
    check_config,
    load_config,
    load_config_dict,
)
from estafeta.errors import ConfigError, FilterSyntaxError
from tests.certificates import Certificates

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
EXAMPLE_ENV = {"WA_APP_SECRET": "wa-app-secret", "WA_VERIFY_TOKEN": "wa-verify"}
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

TENANT = """
[[tenants]]
id = "acme"
"""
SOURCE = """
[[sources]]
id = "hooks"
tenant = "acme"
kind = "generic"
api_key = "k-123"
"""
DESTINATION = """
[[destinations]]
id = "crm"
tenant = "acme"
url = "https://crm.example/hooks"
"""
ROUTE = """
[[routes]]
tenant = "acme"
events = ["lead.*"]
destinations = ["crm"]
"""
MINIMAL = TENANT + SOURCE + DESTINATION + ROUTE


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "estafeta.toml"
    path.write_text(dedent(text), encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """What `estafeta check-config` would print, one line per issue."""
    return [str(issue) for issue in check_config(write(tmp_path, text), env or {})]


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env or {})


# ── valid files ───────────────────────────────────────────────────────────────────────────


def test_minimal_file_loads_with_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)

    assert config.server == ServerConfig()
    assert config.server.listen == "127.0.0.1:8080"
    assert config.storage.url == "sqlite:///./estafeta.db"
    assert config.redis.url is None
    assert config.redis.key_prefix == "estafeta:"  # the keys of a deployment before it existed
    assert config.worker.concurrency == 256
    dest = config.destination("crm")
    assert dest is not None
    assert dest.kind == "http"
    assert (dest.effective_timeout_s(120), dest.max_attempts) == (30, 8)
    assert dest.backoff == BackoffConfig(base_s=1, factor=2, max_s=3600, jitter=0.2)
    assert dest.circuit == CircuitConfig(failures=5, reset_s=30)
    assert config.routes[0].priority == 2


def test_empty_file_is_a_valid_config_with_no_tenants(tmp_path: Path) -> None:
    assert problems(tmp_path, "") == []


@pytest.mark.parametrize(
    "limit", ["100/minute", "5/second", "1000/hour", "10/day", "7 per minute", "3/Hours"]
)
def test_rate_limit_formats_accepted(tmp_path: Path, limit: str) -> None:
    text = TENANT.replace('"acme"', f'"acme"\ningress_rate_limit = "{limit}"')
    assert load(tmp_path, text).tenants[0].ingress_rate_limit == limit


def test_every_source_kind_with_its_required_key(tmp_path: Path) -> None:
    text = TENANT + dedent(f"""
        [[sources]]
        id = "std"
        tenant = "acme"
        kind = "generic"
        secret = "{WHSEC}"
        [[sources]]
        id = "wa"
        tenant = "acme"
        kind = "whatsapp_cloud"
        app_secret = "x"
        [[sources]]
        id = "tw"
        tenant = "acme"
        kind = "twilio"
        auth_token = "x"
        account_sid = "AC1"
        from = "whatsapp:+15550001111"
        [[sources]]
        id = "z"
        tenant = "acme"
        kind = "zapi"
        token = "x"
        [[sources]]
        id = "sp"
        tenant = "acme"
        kind = "sendpulse"
        token = "x"
    """)
    config = load(tmp_path, text)

    assert [s.kind for s in config.sources] == [
        "generic",
        "whatsapp_cloud",
        "twilio",
        "zapi",
        "sendpulse",
    ]
    twilio = config.source("tw")
    assert twilio is not None
    assert twilio.from_ == "whatsapp:+15550001111"


def test_lookups_and_route_ids(tmp_path: Path) -> None:
    text = MINIMAL + dedent("""
        [[routes]]
        id = "named"
        tenant = "acme"
        events = ["message.*"]
        destinations = ["crm"]
        [[tenants]]
        id = "other"
    """)
    config = load(tmp_path, text)

    assert config.tenant("acme") == TenantConfig(id="acme")
    assert config.tenant("nope") is None
    assert config.source("hooks") is config.sources[0]
    assert config.destination("crm") is config.destinations[0]
    assert config.destination("nope") is None
    assert config.route_ids() == ["route-0", "named"]
    assert config.tenant("other") == TenantConfig(id="other")


def test_route_built_in_code_gets_its_default_id() -> None:
    route = RouteConfig(tenant="acme", events=["*"], destinations=["crm"])
    assert route.id is None

    config = Config(routes=[route])

    assert config.routes[0].id == "route-0"
    assert config.route_ids() == ["route-0"]


def test_load_config_dict_does_not_change_its_input() -> None:
    data: dict[str, Any] = {
        "tenants": [{"id": "acme"}],
        "destinations": [{"id": "crm", "tenant": "acme", "url": "${CRM_URL}"}],
        "routes": [{"tenant": "acme", "events": ["*"], "destinations": ["crm"]}],
    }

    config = load_config_dict(
        data, {"CRM_URL": "https://crm.example", "ESTAFETA_LISTEN": "0.0.0.0:1"}
    )

    assert config.destinations[0].url == "https://crm.example"
    assert data["destinations"][0]["url"] == "${CRM_URL}"
    assert "id" not in data["routes"][0]
    assert "server" not in data


# ── one problem per case: the exact line an operator reads ────────────────────────────────

INVALID_CASES: list[tuple[str, str, list[str]]] = [
    (
        "id not lowercase",
        '[[tenants]]\nid = "Acme"',
        [
            "tenants[0].id: invalid id 'Acme': use 1 to 63 lowercase letters, digits, '-' "
            "or '_', starting with a letter or digit"
        ],
    ),
    (
        "id too long",
        f'[[tenants]]\nid = "{"a" * 64}"',
        [
            f"tenants[0].id: invalid id '{'a' * 64}': use 1 to 63 lowercase letters, digits, "
            "'-' or '_', starting with a letter or digit"
        ],
    ),
    (
        "bad rate limit",
        TENANT + 'ingress_rate_limit = "lots"',
        [
            "tenants[0].ingress_rate_limit: invalid rate limit 'lots': write 'N/unit' or "
            "'N per unit' with N >= 1 and unit second, minute, hour or day (e.g. '100/minute')"
        ],
    ),
    (
        "zero rate limit on a destination",
        TENANT + DESTINATION + 'rate_limit = "0/second"',
        [
            "destinations[0].rate_limit: invalid rate limit '0/second': write 'N/unit' or "
            "'N per unit' with N >= 1 and unit second, minute, hour or day (e.g. '100/minute')"
        ],
    ),
    (
        "http destination without url",
        TENANT + '[[destinations]]\nid = "crm"\ntenant = "acme"',
        ["destinations[0].url: required for an http destination"],
    ),
    (
        "http destination with another scheme",
        TENANT + DESTINATION.replace("https://crm.example/hooks", "ftp://crm.example"),
        [
            "destinations[0].url: invalid URL 'ftp://crm.example': must start with http:// or https://"
        ],
    ),
    (
        "destination secret not whsec",
        TENANT + DESTINATION + 'secret = "hunter2"',
        ["destinations[0].secret: must be a Standard Webhooks secret: 'whsec_' followed by base64"],
    ),
    (
        "generic source secret not base64",
        TENANT + SOURCE + 'secret = "whsec_not base64!"',
        ["sources[0].secret: must be a Standard Webhooks secret: 'whsec_' followed by base64"],
    ),
    (
        "generic source with neither secret nor api_key",
        TENANT + '[[sources]]\nid = "hooks"\ntenant = "acme"\nkind = "generic"',
        ["sources[0]: a generic source needs `secret` (Standard Webhooks) or `api_key`"],
    ),
    (
        "whatsapp_cloud without app_secret",
        TENANT + '[[sources]]\nid = "wa"\ntenant = "acme"\nkind = "whatsapp_cloud"',
        ["sources[0].app_secret: required for a whatsapp_cloud source"],
    ),
    (
        "twilio without auth_token",
        TENANT + '[[sources]]\nid = "tw"\ntenant = "acme"\nkind = "twilio"',
        ["sources[0].auth_token: required for a twilio source"],
    ),
    (
        "zapi without token",
        TENANT + '[[sources]]\nid = "z"\ntenant = "acme"\nkind = "zapi"',
        ["sources[0].token: required for a zapi source"],
    ),
    (
        "sendpulse without token",
        TENANT + '[[sources]]\nid = "sp"\ntenant = "acme"\nkind = "sendpulse"\ntoken = ""',
        ["sources[0].token: required for a sendpulse source"],
    ),
    (
        # A token of spaces is as guessable as none: `?token=+` would pass for it.
        "inbound secrets of whitespace only",
        TENANT
        + '[[sources]]\nid = "z"\ntenant = "acme"\nkind = "zapi"\ntoken = " "\n'
        + '[[sources]]\nid = "wa"\ntenant = "acme"\nkind = "whatsapp_cloud"\napp_secret = "x"\n'
        + 'verify_token = "  "\n'
        + SOURCE.replace('"hooks"', '"hooks-2"').replace('"k-123"', '"\\t"'),
        [
            f"sources[{i}].{key}: must not be blank: a secret of whitespace is as guessable as none"
            for i, key in enumerate(("token", "verify_token", "api_key"))
        ],
    ),
    (
        # A secret file's trailing newline: every genuine webhook would be refused as unsigned.
        "inbound secrets with whitespace around them",
        TENANT
        + '[[sources]]\nid = "wa"\ntenant = "acme"\nkind = "whatsapp_cloud"\n'
        + 'app_secret = "6f1d3b8e\\n"\n'
        + '[[sources]]\nid = "tw"\ntenant = "acme"\nkind = "twilio"\nauth_token = " c8a1f4e7"\n',
        [
            f"sources[{i}].{key}: must not start or end with whitespace (a secret file's"
            " newline?): no genuine request would match it"
            for i, key in enumerate(("app_secret", "auth_token"))
        ],
    ),
    (
        # The same newline after a token that sends: every message sent through the source
        # failed for good, at send time, as `invalid_destination` (aiohttp refuses a header
        # holding one), and one around an id or a number was refused by the provider.
        "outbound keys with whitespace around them",
        TENANT
        + '[[sources]]\nid = "wa"\ntenant = "acme"\nkind = "whatsapp_cloud"\napp_secret = "x"\n'
        + 'access_token = "EAAGm0PX4ZCps\\n"\nphone_number_id = " 1149"\n'
        + '[[sources]]\nid = "z"\ntenant = "acme"\nkind = "zapi"\ntoken = "x"\n'
        + 'instance_id = "3C4D"\ninstance_token = "a1b2\\n"\nclient_token = "\\tF00"\n'
        + '[[sources]]\nid = "tw"\ntenant = "acme"\nkind = "twilio"\nauth_token = "x"\n'
        + 'account_sid = "AC1"\nfrom = "whatsapp:+15550001111 "\n',
        [
            f"sources[{i}].{key}: must not start or end with whitespace (a secret file's"
            " newline?): the provider would refuse every send through this source"
            for i, key in (
                (0, "access_token"),
                (0, "phone_number_id"),
                (1, "instance_token"),
                (1, "client_token"),
                (2, "from"),
            )
        ],
    ),
    (
        # A secret file's newline through `${VAR}`: no request could carry it in a header,
        # so the admin key answered 401 to its own operator.
        "an admin key with whitespace around it",
        TENANT + '[security]\nadmin_key = "a2f9c07e41d3\\n"\n',
        [
            "security.admin_key: must not start or end with whitespace (a secret file's"
            " newline?): no genuine request would match it"
        ],
    ),
    (
        # Headers reach the server as Latin-1 and the key is compared as UTF-8: a key with an
        # accent answered 401 to every request of its operator.
        "an admin key that is not ASCII",
        TENANT + '[security]\nadmin_key = "chave-de-administração-2f9c07e4"\n',
        [
            "security.admin_key: must be ASCII: an HTTP header carries no other characters"
            " reliably, so no request would match it"
        ],
    ),
    (
        # The same for a generic source's `api_key`, which also travels in `Authorization`:
        # every request carrying the right key was refused as `invalid_api_key`.
        "a source api_key that is not ASCII, alone or in a rotation list",
        TENANT
        + SOURCE.replace('"k-123"', '"chave-da-integração-7d1e"')
        + SOURCE.replace('"hooks"', '"crm"').replace('"k-123"', '["k-new", "senha-antigüa"]'),
        [
            "sources[0].api_key: must be ASCII: an HTTP header carries no other characters"
            " reliably, so no request would match it",
            "sources[1].api_key[1]: must be ASCII: an HTTP header carries no other characters"
            " reliably, so no request would match it",
        ],
    ),
    (
        "unknown source kind",
        TENANT + SOURCE.replace('"generic"', '"telegram"'),
        [
            "sources[0].kind: Input should be 'generic', 'whatsapp_cloud', 'twilio', 'zapi' "
            "or 'sendpulse'"
        ],
    ),
    (
        "empty events and an empty glob",
        TENANT
        + DESTINATION
        + ROUTE.replace('["lead.*"]', "[]")
        + ROUTE.replace('"lead.*"', '"lead.*", " "'),
        ["routes[0].events: must not be empty", "routes[1].events[1]: must not be empty"],
    ),
    (
        "route without destinations",
        TENANT + ROUTE.replace('["crm"]', "[]"),
        ["routes[0].destinations: must not be empty"],
    ),
    (
        "duplicate ids in every list",
        TENANT
        + TENANT
        + SOURCE
        + SOURCE
        + DESTINATION
        + DESTINATION
        + ROUTE
        + ROUTE.replace("[[routes]]", '[[routes]]\nid = "route-0"'),
        [
            "tenants[1].id: duplicate id 'acme' (first at tenants[0])",
            "sources[1].id: duplicate id 'hooks' (first at sources[0])",
            "destinations[1].id: duplicate id 'crm' (first at destinations[0])",
            "routes[1].id: duplicate id 'route-0' (first at routes[0])",
        ],
    ),
    (
        # One number in two sources: which of them (and which tenant) got its webhooks was
        # arbitrary. A Twilio number is one however its `from` is written; Z-API instances
        # and SendPulse bots route nothing, and two ids that differ are two numbers.
        "one number in two sources, of one tenant or of two",
        TENANT
        + '[[tenants]]\nid = "outra"\n'
        + '[[sources]]\nid = "wa"\ntenant = "acme"\nkind = "whatsapp_cloud"\napp_secret = "x"\n'
        + 'access_token = "t"\n'
        + 'phone_number_id = "1149"\n'
        + '[[sources]]\nid = "tw"\ntenant = "acme"\nkind = "twilio"\nauth_token = "x"\n'
        + 'account_sid = "AC1"\n'
        + 'from = "whatsapp:+551140028922"\n'
        + '[[sources]]\nid = "wa-2"\ntenant = "acme"\nkind = "whatsapp_cloud"\napp_secret = "x"\n'
        + 'access_token = "t"\n'
        + 'phone_number_id = "1149"\n'
        + '[[sources]]\nid = "wa-3"\ntenant = "outra"\nkind = "whatsapp_cloud"\napp_secret = "y"\n'
        + 'access_token = "t"\n'
        + 'phone_number_id = "1149"\n'
        + '[[sources]]\nid = "tw-2"\ntenant = "outra"\nkind = "twilio"\nauth_token = "y"\n'
        + 'account_sid = "AC2"\n'
        + 'from = "+55 11 4002-8922"\n'
        + '[[sources]]\nid = "wa-4"\ntenant = "outra"\nkind = "whatsapp_cloud"\napp_secret = "y"\n'
        + 'access_token = "t"\n'
        + 'phone_number_id = "11490"\n'
        + '[[sources]]\nid = "z"\ntenant = "acme"\nkind = "zapi"\ntoken = "x"\n'
        + 'instance_token = "i"\nclient_token = "c"\n'
        + 'instance_id = "3C4D"\n'
        + '[[sources]]\nid = "z-2"\ntenant = "outra"\nkind = "zapi"\ntoken = "y"\n'
        + 'instance_token = "i"\nclient_token = "c"\n'
        + 'instance_id = "3C4D"\n',
        [
            "sources[2].phone_number_id: '1149' is also at sources[0].phone_number_id: one"
            " number is one source (its webhooks go to the source that has it)",
            "sources[3].phone_number_id: '1149' is also at sources[0].phone_number_id: one"
            " number is one source (its webhooks go to the source that has it)",
            "sources[4].from: '+55 11 4002-8922' is also at sources[1].from: one number is"
            " one source (its webhooks go to the source that has it)",
        ],
    ),
    (
        "unknown tenant everywhere",
        TENANT
        + SOURCE.replace('tenant = "acme"', 'tenant = "acne"')
        + DESTINATION.replace('tenant = "acme"', 'tenant = "zzz"')
        + ROUTE.replace('tenant = "acme"', 'tenant = "ACME"'),
        [
            "sources[0].tenant: unknown tenant 'acne' (did you mean 'acme'?)",
            "destinations[0].tenant: unknown tenant 'zzz'",
            "routes[0].tenant: unknown tenant 'ACME'",
        ],
    ),
    (
        "no tenants at all",
        SOURCE,
        ["sources[0].tenant: unknown tenant 'acme' (no [[tenants]] are defined)"],
    ),
    (
        "unknown route destination",
        TENANT + DESTINATION + ROUTE.replace('["crm"]', '["crm", "crmm"]'),
        ["routes[0].destinations[1]: unknown destination 'crmm' (did you mean 'crm'?)"],
    ),
    (
        "route destination of another tenant",
        TENANT
        + '[[tenants]]\nid = "beta"'
        + DESTINATION.replace('"crm"', '"beta-crm"').replace('tenant = "acme"', 'tenant = "beta"')
        + ROUTE.replace('["crm"]', '["beta-crm"]'),
        ["routes[0].destinations[0]: destination 'beta-crm' belongs to tenant 'beta', not 'acme'"],
    ),
    (
        "unknown key with suggestion",
        TENANT + DESTINATION.replace("url =", "urll ="),
        ["destinations[0].urll: unknown key 'urll' (did you mean 'url'?)"],
    ),
    (
        "unknown key in a nested table",
        TENANT + DESTINATION + "backoff = { base_s = 1, jiter = 0.5 }",
        ["destinations[0].backoff.jiter: unknown key 'jiter' (did you mean 'jitter'?)"],
    ),
    (
        "unknown table",
        "[[destination]]\nid = 'crm'",
        ["destination: unknown key 'destination' (did you mean 'destinations'?)"],
    ),
    (
        "unknown key without a close match",
        "[server]\ncolour = 'blue'",
        ["server.colour: unknown key 'colour'"],
    ),
    (
        "missing required key",
        TENANT
        + ROUTE.replace('tenant = "acme"\n', "").replace('["crm"]', '["x"]')
        + DESTINATION.replace('"crm"', '"x"'),
        ["routes[0].tenant: required key is missing"],
    ),
    (
        "numbers out of range",
        TENANT + DESTINATION + "timeout_s = 301\nmax_attempts = 0\n[worker]\nlease_s = 0",
        [
            "worker.lease_s: Input should be greater than 0",
            "destinations[0].timeout_s: Input should be less than or equal to 300",
            "destinations[0].max_attempts: Input should be greater than or equal to 1",
        ],
    ),
    (
        "a spool bound past the driver's own timeouts",
        "[storage]\nspool_after_s = 31",
        ["storage.spool_after_s: Input should be less than or equal to 30"],
    ),
    (
        # A typo (3600 for 3.6) went unnoticed: an idle worker looked for due deliveries once
        # an hour, rescued expired leases an hour late, or outwaited any supervisor's stop.
        "a worker's intervals past their bounds",
        "[worker]\npoll_interval_s = 3600\nshutdown_grace_s = 3600\nrescue_interval_s = 3600",
        [
            "worker.poll_interval_s: Input should be less than or equal to 60",
            "worker.shutdown_grace_s: Input should be less than or equal to 600",
            "worker.rescue_interval_s: Input should be less than or equal to 300",
        ],
    ),
    (
        "backoff ceiling below its base",
        TENANT + DESTINATION + "backoff = { base_s = 10, max_s = 5 }",
        ["destinations[0].backoff.max_s: must be at least base_s (10)"],
    ),
    (
        "wrong types",
        'server = "fast"\n[worker]\nconcurrency = "many"',
        [
            "server: must be a table",
            "worker.concurrency: Input should be a valid integer, unable to parse string as an "
            "integer",
        ],
    ),
    (
        # One bracket where two are needed, or the reverse: "must be an array" left the
        # operator to find out which TOML syntax makes one.
        "[tenants] and [sources] written with one bracket, [[worker]] with two",
        '[tenants]\nid = "acme"\n[sources]\nid = "hooks"\n[[worker]]\nconcurrency = 8',
        [
            "worker: must be a table: write [worker], not [[worker]]",
            "tenants: must be an array of tables: write [[tenants]], not [tenants]",
            "sources: must be an array of tables: write [[sources]], not [sources]",
        ],
    ),
    (
        # TOML's most common slip: one value where the key takes a list of them.
        "a route's events and destinations written as one string each",
        TENANT + DESTINATION + ROUTE.replace('["lead.*"]', '"lead.*"').replace('["crm"]', '"crm"'),
        ["routes[0].events: must be an array", "routes[0].destinations: must be an array"],
    ),
    (
        "listen without a port",
        '[server]\nlisten = "localhost"',
        ["server.listen: invalid address 'localhost': write HOST:PORT, e.g. '0.0.0.0:8080'"],
    ),
    (
        "a worker's metrics address past the last port",
        '[worker]\nmetrics_listen = "0.0.0.0:65536"',
        [
            "worker.metrics_listen: invalid address '0.0.0.0:65536': write HOST:PORT, e.g. "
            "'0.0.0.0:8080'"
        ],
    ),
    (
        "no-workers alert quicker than workers are seen",
        "[worker]\nalert_no_workers_s = 10",
        [
            "worker.alert_no_workers_s: must be at least 30 s: a running worker is seen only"
            " once every 10 s"
        ],
    ),
    (
        "a refused-webhooks alert that would fire at the first refusal",
        "[worker]\nalert_webhooks_refused_s = 0",
        ["worker.alert_webhooks_refused_s: Input should be greater than 0"],
    ),
    (  # each of these passed, and then every delivery to the destination failed for good
        "a header name that is no HTTP token",
        TENANT + DESTINATION + 'headers = { "X Token" = "t" }',
        [
            "destinations[0].headers: header name 'X Token' is not an HTTP token: letters,"
            " digits and !#$%&'*+-.^_`|~ only"
        ],
    ),
    (  # the value is not echoed: a header is often a credential
        "a header value that would split the request",
        TENANT + DESTINATION + 'headers = { Authorization = "Bearer SECRET\\r\\nX-Evil: 1" }',
        [
            "destinations[0].headers: header 'Authorization': its value holds a control"
            " character (CR, LF, NUL …)"
        ],
    ),
    (  # aiohttp refused every delivery: "Cannot combine AUTHORIZATION header with AUTH"
        "an Authorization header beside a user in the URL",
        TENANT
        + DESTINATION.replace("https://", "https://hub:pa55@")
        + 'headers = { authorization = "Bearer t" }',
        [
            "destinations[0].headers: an Authorization header and a user in `url` (sent as"
            " Basic authorization) cannot go together: keep one"
        ],
    ),
    (  # was silently left out
        "a header estafeta sets itself",
        TENANT + DESTINATION + 'headers = { "Content-Type" = "text/plain" }',
        [
            "destinations[0].headers: header 'Content-Type' is set by estafeta and cannot be"
            " replaced"
        ],
    ),
    (  # only the first was reported: the file needed one check per header to fix
        "every header estafeta sets or that describes the body",
        TENANT
        + DESTINATION
        + 'headers = { "Content-Type" = "t", "X-Ok" = "1", "User-Agent" = "u",'
        + ' "Content-Length" = "3" }',
        [
            "destinations[0].headers: header 'Content-Type' is set by estafeta and cannot be"
            " replaced",
            "destinations[0].headers: header 'User-Agent' is set by estafeta and cannot be"
            " replaced",
            "destinations[0].headers: header 'Content-Length' describes the body, which"
            " estafeta sends as it signed it: it cannot be set",
        ],
    ),
    (  # passed, then the receiver got other bytes than the signed body, or none it could read
        "a header that frames or encodes the body",
        TENANT + DESTINATION + 'headers = { "Content-Length" = "3", "transfer-encoding" = "x" }',
        [
            f"destinations[0].headers: header {name!r} describes the body, which"
            " estafeta sends as it signed it: it cannot be set"
            for name in ("Content-Length", "transfer-encoding")
        ],
    ),
    (  # each of these passed, then `migrate` and `serve` died with a Python traceback
        "a database URL whose port is no port",
        '[storage]\nurl = "postgresql://u@db:99999/estafeta"',
        ["storage.url: invalid database URL: the port must be a number 0-65535"],
    ),
    (
        "a database URL parameter the driver does not take",
        '[storage]\nurl = "postgresql://u@db/estafeta?keepalives=1"',
        [
            "storage.url: unsupported database URL parameter 'keepalives' (supported:"
            " sslmode, ssl, host, port, user, password, database, passfile, target_session_attrs,"
            " application_name, options, connect_timeout, statement_cache_size)"
        ],
    ),
    (  # read as the host's: a DNS error, exit 3, that said nothing of the password
        "a database password holding '@' and '/' as written",
        '[storage]\nurl = "postgresql://hub:p@ss/w0rd@db/estafeta"',
        [
            "storage.url: invalid database URL: write a '/', '?', '#' or '@' of its user or"
            " password percent-encoded (%2F, %3F, %23, %40)"
        ],
    ),
    (  # the rest was read as a query, and its error quoted the password's end as a name
        "a database password holding '?' as written",
        '[storage]\nurl = "postgresql://hub:pa?ss@db/estafeta"',
        [
            "storage.url: invalid database URL: write a '/', '?', '#' or '@' of its user or"
            " password percent-encoded (%2F, %3F, %23, %40)"
        ],
    ),
    (  # an `@` in the query only in a parameter's value: here a password's `=` made one
        "a database password holding '@', '?' and '=' as written",
        '[storage]\nurl = "postgresql://hub:p@ss?w=0rd@db/estafeta"',
        [
            "storage.url: invalid database URL: write a '/', '?', '#' or '@' of its user or"
            " password percent-encoded (%2F, %3F, %23, %40)"
        ],
    ),
    (  # read as a fragment: the password's first part was taken for the port
        "a database password holding '#' as written",
        '[storage]\nurl = "postgresql://hub:pa#ss@db/estafeta"',
        [
            "storage.url: invalid database URL: write a '/', '?', '#' or '@' of its user or"
            " password percent-encoded (%2F, %3F, %23, %40)"
        ],
    ),
    (
        "a host list with a port that is no port",
        '[storage]\nurl = "postgresql://u@db1:5432,db2:port/estafeta"',
        ["storage.url: invalid database URL: the port must be a number 0-65535"],
    ),
    (  # asyncpg reads `[::1]:5433,db2` as ::1 on port 5432: the port would be lost
        "a host list holding an IPv6 address",
        '[storage]\nurl = "postgresql://u@[::1]:5433,db2/estafeta"',
        ["storage.url: invalid database URL: a host list cannot hold an IPv6 address"],
    ),
    (
        "an IPv6 host with a port that is no port",
        '[storage]\nurl = "postgresql://u@[::1]:65536/estafeta"',
        ["storage.url: invalid database URL: the port must be a number 0-65535"],
    ),
    (
        "a statement cache size that is no number",
        '[storage]\nurl = "postgresql://u@db/estafeta?statement_cache_size=off"',
        [
            "storage.url: invalid statement_cache_size 'off': a number of statements, 0 behind"
            " PgBouncer in transaction mode"
        ],
    ),
    (
        "a connect timeout of no time",
        '[storage]\nurl = "postgresql://u@db/estafeta?connect_timeout=0"',
        ["storage.url: invalid connect_timeout '0': a whole number of seconds > 0"],
    ),
    (
        "an sslmode libpq does not have",
        '[storage]\nurl = "postgresql://u@db/estafeta?sslmode=on"',
        [
            "storage.url: invalid sslmode 'on': use disable, allow, prefer, require, verify-ca,"
            " verify-full"
        ],
    ),
    (
        "an in-memory SQLite database, which forgets every event at exit",
        '[storage]\nurl = "sqlite://"',
        ["storage.url: a SQLite URL needs a file: write sqlite:///PATH"],
    ),
    (  # `serve` died at start, or ran with every task that touches Redis crash-looping
        "a Redis URL whose port is no number",
        '[redis]\nurl = "redis://cache:abc/0"',
        ["redis.url: invalid Redis URL: Port could not be cast to integer value as 'abc'"],
    ),
    (  # redis-py reads a path that is no number as database 0: another deployment's, maybe
        "a Redis database number that is no number",
        '[redis]\nurl = "redis://cache:6379/one"',
        ["redis.url: invalid Redis URL: its path must be a database number (/0, /1 …)"],
    ),
    (
        "a Redis URL parameter the client does not take",
        '[redis]\nurl = "redis://cache:6379/0?timeout=5"',
        ["redis.url: invalid Redis URL: unsupported parameter in its query"],
    ),
    (  # Before: redis-py's RedisError escaped validation, a traceback from check-config
        "a Redis URL parameter with a value the client refuses as it connects",
        '[redis]\nurl = "rediss://:pw@cache:6379/0?ssl_cert_reqs=sometimes"',
        ["redis.url: invalid Redis URL: Invalid SSL Certificate Requirements Flag: sometimes"],
    ),
    (
        "a Redis protocol version the client does not speak",
        '[redis]\nurl = "redis://cache:6379/0?protocol=4"',
        ["redis.url: invalid Redis URL: protocol must be either 2 or 3"],
    ),
    (  # Before: accepted, and `serve` ended in a LookupError traceback at its first command
        "a Redis text encoding Python does not know",
        '[redis]\nurl = "redis://cache:6379/0?encoding=utf8mb4"',
        ["redis.url: invalid Redis URL: unknown encoding: utf8mb4"],
    ),
    (
        "a Redis encoding error handler Python does not know",
        '[redis]\nurl = "redis://cache:6379/0?encoding_errors=skip"',
        ["redis.url: invalid Redis URL: unknown error handler name 'skip'"],
    ),
    (  # it starts every key: `<prefix>circuits`, not `stagingcircuits`
        "a Redis key prefix that does not end with a colon",
        '[redis]\nkey_prefix = "staging"',
        [
            "redis.key_prefix: invalid key prefix 'staging': use 1 to 64 letters, digits, '_',"
            " '.', '-' or ':', ending with ':' (e.g. \"estafeta-staging:\")"
        ],
    ),
    (  # a space, a `*` (a SCAN pattern) or a newline would make keys no tool shows plainly
        "a Redis key prefix with a character keys should not have",
        '[redis]\nkey_prefix = "clinica sol:"',
        [
            "redis.key_prefix: invalid key prefix 'clinica sol:': use 1 to 64 letters, digits,"
            " '_', '.', '-' or ':', ending with ':' (e.g. \"estafeta-staging:\")"
        ],
    ),
    (
        "a Redis key prefix longer than 64 characters",
        f'[redis]\nkey_prefix = "{"a" * 64}:"',
        [
            f"redis.key_prefix: invalid key prefix '{'a' * 64}:': use 1 to 64 letters, digits,"
            " '_', '.', '-' or ':', ending with ':' (e.g. \"estafeta-staging:\")"
        ],
    ),
    (  # the store keeps 40 characters: PostgreSQL refused it at `migrate`, naming no key
        "a rate limit longer than the store keeps",
        f'[[tenants]]\nid = "t"\ningress_rate_limit = "{"1" * 40}/minute"',
        [
            f"tenants[0].ingress_rate_limit: invalid rate limit '{'1' * 40}/minute': write"
            " 'N/unit' or 'N per unit' with N >= 1 and unit second, minute, hour or day"
            " (e.g. '100/minute')"
        ],
    ),
    (  # `limits` reads a zero multiple as one: this was 10 a minute
        "a rate limit over zero minutes",
        '[[tenants]]\nid = "t"\ningress_rate_limit = "10 per 0 minutes"',
        [
            "tenants[0].ingress_rate_limit: invalid rate limit '10 per 0 minutes': write"
            " 'N/unit' or 'N per unit' with N >= 1 and unit second, minute, hour or day"
            " (e.g. '100/minute')"
        ],
    ),
    (
        "a rate limit per month",
        '[[tenants]]\nid = "t"\ningress_rate_limit = "100/month"',
        [
            "tenants[0].ingress_rate_limit: invalid rate limit '100/month': write"
            " 'N/unit' or 'N per unit' with N >= 1 and unit second, minute, hour or day"
            " (e.g. '100/minute')"
        ],
    ),
    (  # str.isdigit() is true of '²', which int() refuses: the error was int()'s
        "a port of superscript digits",
        '[server]\nlisten = "127.0.0.1:²"',
        ["server.listen: invalid address '127.0.0.1:²': write HOST:PORT, e.g. '0.0.0.0:8080'"],
    ),
    (
        "unsupported database",
        '[storage]\nurl = "mysql://root:pw@db/estafeta"',
        [
            "storage.url: unsupported database URL scheme 'mysql': use sqlite:///PATH or "
            "postgresql://USER@HOST/DB"
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_invalid_file_reports_exactly(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert problems(tmp_path, text) == expected


def test_filter_syntax_error_is_located_at_the_route(tmp_path: Path) -> None:
    from estafeta.routing.filter import parse

    expression = "data.kind = 'text'"
    with pytest.raises(FilterSyntaxError) as caught:
        parse(expression)
    text = TENANT + DESTINATION + ROUTE + f'filter = "{expression}"'

    assert problems(tmp_path, text) == [
        f"routes[0].filter: {caught.value.reason} (at character {caught.value.position})"
    ]


@pytest.mark.parametrize("key", ["", " ", "data.", ".data", "data..conversation_id", "data. x"])
def test_an_ordering_key_that_can_never_match_is_an_error(tmp_path: Path, key: str) -> None:
    # These loaded, and every event silently got no key: per-key FIFO was off.
    text = MINIMAL + f'ordering_key = "{key}"\n'

    assert problems(tmp_path, text) == [
        f"routes[0].ordering_key: invalid path {key!r}: write keys joined by '.', e.g. "
        "'data.conversation_id'"
    ]


def test_an_ordering_key_may_name_any_json_key(tmp_path: Path) -> None:
    text = MINIMAL + 'ordering_key = "data.conversation-id.0"\n'

    assert load(tmp_path, text).routes[0].ordering_key == "data.conversation-id.0"


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("filter = \"kind == 'text'\"", "kind"),
        ("filter = \"data.kind == 'text' or not contact.name\"", "contact.name"),
        ('ordering_key = "conversation_id"', "conversation_id"),
    ],
)
def test_a_path_outside_the_events_fields_is_an_error(
    tmp_path: Path, setting: str, path: str
) -> None:
    # These loaded, and the filter never matched (every route's events silently dropped)
    # or every event got no ordering key: the event's own fields are under `data.`.
    key = setting.split(" ", 1)[0]
    root = path.split(".", 1)[0]
    assert problems(tmp_path, MINIMAL + setting + "\n") == [
        f"routes[0].{key}: {root!r} is not a field of an event (a path starts with id, type, "
        f"tenant, source, occurred_at, received_at, data): did you mean 'data.{path}'?"
    ]


def test_an_unpadded_webhook_secret_is_taken_as_the_signing_library_takes_it(
    tmp_path: Path,
) -> None:
    # Refused at start-up though valid: base64 without its '=' padding, as some tools print it.
    unpadded = "whsec_" + base64.b64encode(b"0123456789abcdefghij").decode().rstrip("=")
    config = load(tmp_path, TENANT + SOURCE.replace('api_key = "k-123"', f'secret = "{unpadded}"'))
    secret = config.sources[0].secret
    assert secret == unpadded
    signature = Webhook(secret).sign("msg_1", datetime.fromtimestamp(1, UTC), "{}")
    assert signature.startswith("v1,")


def test_true_or_false_is_not_a_number(tmp_path: Path) -> None:
    # Pydantic's lax mode read `priority = true` as 1 and `lease_s = false` as 0.0.
    text = MINIMAL + "priority = true\n[worker]\nconcurrency = false\nlease_s = true\n"

    assert problems(tmp_path, text) == [
        "worker.concurrency: must be a number, not true or false",
        "worker.lease_s: must be a number, not true or false",
        "routes[0].priority: must be a number, not true or false",
    ]


def test_a_sources_event_type_is_one_an_event_can_have(tmp_path: Path) -> None:
    # The stored type is at most 200 characters, as a body's "type" is: a longer one was
    # accepted here and answered 500 to every webhook without a "type" on PostgreSQL.
    source = SOURCE + 'event_type = "{}"\n'
    assert problems(tmp_path, TENANT + source.format("t" * 200)) == []
    assert problems(tmp_path, TENANT + source.format("t" * 201)) == [
        "sources[0].event_type: must be at most 200 characters, as an event's type"
    ]


def test_a_nul_character_is_refused_in_every_string(tmp_path: Path) -> None:
    # TOML writes one as "\u0000"; accepted here, it made `serve` fail at start: PostgreSQL's
    # text cannot hold it (tenants and routes are copied into the store) and a path holding
    # it crashed with a traceback. No setting means one.
    nul = "\\u0000"
    text = dedent(f"""
        [storage]
        spool_dir = "./spool{nul}"
        [[tenants]]
        id = "acme"
        name = "Acme{nul}"
        [[sources]]
        id = "hooks"
        tenant = "acme"
        kind = "generic"
        api_key = "k-123"
        event_type = "lead{nul}"
        [[destinations]]
        id = "crm"
        tenant = "acme"
        url = "https://crm.example/hooks{nul}"
        [[routes]]
        tenant = "acme"
        events = ["lead.*", "x{nul}"]
        destinations = ["crm"]
        filter = "data.kind == 'a{nul}'"
        ordering_key = "data.a{nul}"
    """)
    message = "must not contain a NUL character (\\u0000)"

    assert problems(tmp_path, text) == [
        f"storage.spool_dir: {message}",
        f"tenants[0].name: {message}",
        f"sources[0].event_type: {message}",
        f"destinations[0].url: {message}",
        f"routes[0].events: {message}",
        f"routes[0].filter: {message}",
        f"routes[0].ordering_key: {message}",
    ]


def test_valid_filter_is_accepted(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL + "filter = \"data.kind == 'text'\"")
    assert config.routes[0].filter == "data.kind == 'text'"


def test_every_problem_in_one_file_is_reported_in_file_order(tmp_path: Path) -> None:
    text = dedent("""
        [server]
        max_body_bytes = 0

        [[tenants]]
        id = "acme"

        [[routes]]
        tenant = "acme"
        events = ["*"]
        destinations = ["crmm", "erp"]

        [[sources]]
        id = "Wa"
        tenant = "acme"
        kind = "whatsapp_cloud"
        app_secret = "${WA_APP_SECRET}"

        [[destinations]]
        id = "crm"
        tenant = "acme"
        url = "https://crm.example"
        timeout_s = -1
    """)

    assert problems(tmp_path, text) == [
        "server.max_body_bytes: Input should be greater than 0",
        "sources[0].app_secret: environment variable WA_APP_SECRET is not set",
        "sources[0].id: invalid id 'Wa': use 1 to 63 lowercase letters, digits, '-' or '_', "
        "starting with a letter or digit",
        "destinations[0].timeout_s: Input should be greater than 0",
        "routes[0].destinations[0]: unknown destination 'crmm' (did you mean 'crm'?)",
        "routes[0].destinations[1]: unknown destination 'erp'",
    ]


def test_a_missing_required_key_is_reported_beside_its_entrys_other_problems(
    tmp_path: Path,
) -> None:
    # Checked only once the rest of the entry was valid, the missing key came up at the
    # next check-config, after the operator had fixed everything it said.
    text = TENANT + dedent("""
        [[sources]]
        id = "wa"
        tenant = "acme"
        kind = "whatsapp_cloud"
        send_max_attempts = 0

        [[sources]]
        id = "hooks"
        tenant = "acme"
        kind = "generic"
        event_type = ""

        [[sources]]
        id = "tw"
        tenant = "acme"
        kind = "twilio"
        token = "x"

        [[destinations]]
        id = "crm"
        tenant = "acme"
        max_attempts = 0
    """)

    assert problems(tmp_path, text) == [
        "sources[0].send_max_attempts: Input should be greater than or equal to 1",
        "sources[0].app_secret: required for a whatsapp_cloud source",
        "sources[1].event_type: must not be empty",
        "sources[1]: a generic source needs `secret` (Standard Webhooks) or `api_key`",
        "sources[2].token: not a key of a twilio source (it takes auth_token, public_url, "
        "account_sid, from, api_base, send_rate_limit, send_max_attempts)",
        "sources[2].auth_token: required for a twilio source",
        "destinations[0].max_attempts: Input should be greater than or equal to 1",
        "destinations[0].url: required for an http destination",
    ]


def test_config_error_message_lists_every_issue(tmp_path: Path) -> None:
    path = write(tmp_path, TENANT + ROUTE)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})

    assert str(caught.value) == (
        "invalid configuration (1 problem):\n  routes[0].destinations[0]: unknown destination 'crm'"
    )


# ── a key of another kind of source ───────────────────────────────────────────────────────

# What each kind takes besides id, tenant and kind, as the message states it (DESIGN §3.2).
KIND_TAKES = {
    "generic": "secret, api_key, event_type",
    "whatsapp_cloud": (
        "app_secret, verify_token, access_token, phone_number_id, api_base, send_rate_limit, "
        "send_max_attempts"
    ),
    "twilio": (
        "auth_token, public_url, account_sid, from, api_base, send_rate_limit, send_max_attempts"
    ),
    "zapi": (
        "token, instance_id, instance_token, client_token, api_base, send_rate_limit, "
        "send_max_attempts"
    ),
    "sendpulse": (
        "token, client_id, client_secret, bot_id, api_base, send_rate_limit, send_max_attempts"
    ),
}
# A well-formed value of every source key, so that only the kind can make it wrong.
KEY_VALUES = {
    "secret": f'"{WHSEC}"',
    "api_key": '"k-123"',
    "event_type": '"crm.webhook"',
    "app_secret": '"x"',
    "verify_token": '"x"',
    "auth_token": '"x"',
    "public_url": '"https://hooks.example.com"',
    "token": '"x"',
    "access_token": '"x"',
    "phone_number_id": '"1"',
    "api_base": '"https://api.example.com"',
    "account_sid": '"AC1"',
    "from": '"whatsapp:+15550001111"',
    "instance_id": '"i"',
    "instance_token": '"x"',
    "client_token": '"x"',
    "client_id": '"c"',
    "client_secret": '"x"',
    "bot_id": '"b"',
    "send_rate_limit": '"80/second"',
    "send_max_attempts": "3",
}
# The key each kind cannot do without, so that a source is valid apart from the stray key.
KIND_NEEDS = {
    "generic": "api_key",
    "whatsapp_cloud": "app_secret",
    "twilio": "auth_token",
    "zapi": "token",
    "sendpulse": "token",
}


def a_source(kind: str, *keys: str, source_id: str = "s") -> str:
    lines = [f'[[sources]]\nid = "{source_id}"\ntenant = "acme"\nkind = "{kind}"']
    written = dict.fromkeys((KIND_NEEDS[kind], *keys))
    lines += [f"{key} = {KEY_VALUES[key]}" for key in written]
    return "\n".join(lines) + "\n"


FOREIGN_KEYS = [
    (kind, key)
    for kind, takes in KIND_TAKES.items()
    for key in KEY_VALUES
    if key not in takes.split(", ")
]


def test_every_key_of_a_source_belongs_to_some_kind() -> None:
    # A field added to SourceConfig without a place in the kinds' table would be refused on
    # every source; this says so before an operator does.
    keys = {field.alias or name for name, field in SourceConfig.model_fields.items()}
    assert keys - {"id", "tenant", "kind"} == set(KEY_VALUES)


def test_each_kind_takes_the_keys_it_lists(tmp_path: Path) -> None:
    text = TENANT + "".join(
        a_source(kind, *takes.split(", "), source_id=kind.replace("_", "-"))
        for kind, takes in KIND_TAKES.items()
    )
    assert problems(tmp_path, text) == []


@pytest.mark.parametrize(("kind", "key"), FOREIGN_KEYS, ids=[f"{k}-{x}" for k, x in FOREIGN_KEYS])
def test_a_key_of_another_kind_is_an_error_at_the_key(tmp_path: Path, kind: str, key: str) -> None:
    # These loaded and were silently ignored: `api_key` on a whatsapp_cloud source protected
    # nothing, `send_rate_limit` on a generic one limited nothing.
    assert problems(tmp_path, TENANT + a_source(kind, key)) == [
        f"sources[0].{key}: not a key of a {kind} source (it takes {KIND_TAKES[kind]})"
    ]


def test_every_key_of_another_kind_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = TENANT + dedent(f"""
        [[sources]]
        id = "wa"
        tenant = "acme"
        kind = "whatsapp_cloud"
        app_secret = "x"
        api_key = "k"
        secret = "{WHSEC}"

        [[sources]]
        id = "hooks"
        tenant = "acme"
        kind = "generic"
        secret = "{WHSEC}"
        app_secret = "x"
        send_rate_limit = "10/second"
        api_base = "ftp://not-even-a-valid-url"

        [[sources]]
        id = "Tw"
        tenant = "acme"
        kind = "twilio"
        auth_token = "x"
        token = "x"
    """)

    # Entries in file order; within one, its keys in the order the model declares them.
    assert problems(tmp_path, text) == [
        f"sources[0].secret: not a key of a whatsapp_cloud source "
        f"(it takes {KIND_TAKES['whatsapp_cloud']})",
        f"sources[0].api_key: not a key of a whatsapp_cloud source "
        f"(it takes {KIND_TAKES['whatsapp_cloud']})",
        f"sources[1].send_rate_limit: not a key of a generic source "
        f"(it takes {KIND_TAKES['generic']})",
        f"sources[1].app_secret: not a key of a generic source (it takes {KIND_TAKES['generic']})",
        f"sources[1].api_base: not a key of a generic source (it takes {KIND_TAKES['generic']})",
        "sources[2].id: invalid id 'Tw': use 1 to 63 lowercase letters, digits, '-' or '_', "
        "starting with a letter or digit",
        f"sources[2].token: not a key of a twilio source (it takes {KIND_TAKES['twilio']})",
    ]


def test_a_source_with_part_of_its_outbound_keys_is_refused_naming_what_it_lacks(
    tmp_path: Path,
) -> None:
    # These loaded, and every send through them was answered `400 source_cannot_send`.
    text = TENANT + dedent("""
        [[sources]]
        id = "wa"
        tenant = "acme"
        kind = "whatsapp_cloud"
        app_secret = "x"
        access_token = "t"

        [[sources]]
        id = "tw"
        tenant = "acme"
        kind = "twilio"
        auth_token = "x"
        from = "whatsapp:+15550001111"

        [[sources]]
        id = "tw-in"
        tenant = "acme"
        kind = "twilio"
        auth_token = "x"

        [[sources]]
        id = "tw-out"
        tenant = "acme"
        kind = "twilio"
        account_sid = "AC1"
        from = "whatsapp:+15550002222"

        [[sources]]
        id = "z"
        tenant = "acme"
        kind = "zapi"
        token = "x"
        instance_id = "i"

        [[sources]]
        id = "sp"
        tenant = "acme"
        kind = "sendpulse"
        token = "x"
        client_id = "c"
        client_secret = "${SP_SECRET}"
        bot_id = "b"
    """)

    # All at once, each at the key that is missing; a receive-only source (tw-in) is fine.
    assert problems(tmp_path, text, {"SP_SECRET": ""}) == [
        "sources[0].phone_number_id: required to send through source 'wa', which sets"
        " access_token: a whatsapp_cloud source sends with access_token, phone_number_id",
        "sources[1].account_sid: required to send through source 'tw', which sets from:"
        " a twilio source sends with account_sid, auth_token, from",
        # The key the kind needs anyway is said once, as that.
        "sources[3].auth_token: required for a twilio source",
        "sources[4].instance_token: required to send through source 'z', which sets"
        " instance_id: a zapi source sends with instance_id, instance_token, client_token",
        "sources[4].client_token: required to send through source 'z', which sets"
        " instance_id: a zapi source sends with instance_id, instance_token, client_token",
        "sources[5].client_secret: required to send through source 'sp', which sets"
        " client_id, bot_id: a sendpulse source sends with client_id, client_secret, bot_id"
        " (environment variable SP_SECRET is empty)",
    ]


def test_a_source_built_in_code_with_part_of_its_outbound_keys_is_refused() -> None:
    with pytest.raises(ValidationError, match="required to send through source 'wa'"):
        SourceConfig.model_validate(
            {"id": "wa", "tenant": "acme", "kind": "whatsapp_cloud", "app_secret": "x"}
            | {"phone_number_id": "1"}
        )


def test_a_source_built_in_code_with_a_key_of_another_kind_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        SourceConfig(id="wa", tenant="acme", kind="whatsapp_cloud", app_secret="x", api_key="k")

    (error,) = refused.value.errors()
    assert error["loc"] == ("api_key",)
    assert error["msg"].endswith(
        "not a key of a whatsapp_cloud source (it takes app_secret, "
        "verify_token, access_token, phone_number_id, api_base, send_rate_limit, "
        "send_max_attempts)"
    )


def test_the_servers_public_url_is_given_to_twilio_sources_only(tmp_path: Path) -> None:
    # `[server] public_url` is not a key of the other kinds: they must not be refused for it.
    text = (
        '[server]\npublic_url = "https://hooks.example.com"\n'
        + TENANT
        + "".join(a_source(kind, source_id=kind.replace("_", "-")) for kind in KIND_TAKES)
    )
    config = load(tmp_path, text)
    assert {s.id: s.public_url for s in config.sources} == {
        "generic": None,
        "whatsapp-cloud": None,
        "twilio": "https://hooks.example.com",
        "zapi": None,
        "sendpulse": None,
    }


# ── the file itself ───────────────────────────────────────────────────────────────────────


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[server\nlisten = "x"\n')

    assert [str(i) for i in check_config(path, {})] == [
        f"{path}:line 1, column 8: invalid TOML: Expected ']' at the end of a table declaration"
    ]


def test_toml_error_at_end_of_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "unterminated')

    assert [str(i) for i in check_config(path, {})] == [
        f"{path}:end of file: invalid TOML: Unterminated string"
    ]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_toml_inf_and_nan_are_not_numbers_a_setting_accepts(tmp_path: Path, value: str) -> None:
    # `lease_s = inf` used to load, and the worker then failed on int(inf) at start.
    text = f"[worker]\nlease_s = {value}\n[[destinations]]\nid = 'd'\ntenant = 'acme'\n"
    text += f"url = 'http://127.0.0.1/'\nbackoff = {{ max_s = {value} }}\n" + TENANT

    assert problems(tmp_path, text) == [
        "worker.lease_s: Input should be a finite number",
        "destinations[0].backoff.max_s: Input should be a finite number",
    ]


WORKER_DURATIONS = (
    "lease_s",
    "alert_destination_down_s",
    "alert_no_workers_s",
    "alert_webhooks_refused_s",
    "alert_store_down_s",
    "alert_redis_down_s",
)


@pytest.mark.parametrize("value", ["2_592_001", "1e15", "1e308"])
def test_a_duration_longer_than_30_days_is_refused(tmp_path: Path, value: str) -> None:
    # These used to load: the worker then failed on round(inf) (lease_s at start, reset_s once
    # the circuit opened, max_s at the first retry), a retry due after year 9999 could not be
    # shown by the API, and one past 2**63 ms could not be stored.
    text = "[worker]\n" + "".join(f"{key} = {value}\n" for key in WORKER_DURATIONS)
    text += "[[destinations]]\nid = 'd'\ntenant = 'acme'\nurl = 'http://127.0.0.1/'\n"
    text += f"backoff = {{ base_s = {value}, max_s = {value} }}\n"
    text += f"circuit = {{ reset_s = {value}, window_s = {value} }}\n" + TENANT

    too_long = "Input should be less than or equal to 2592000"
    assert problems(tmp_path, text) == [f"worker.{key}: {too_long}" for key in WORKER_DURATIONS] + [
        f"destinations[0].{key}: {too_long}"
        for key in ("backoff.base_s", "backoff.max_s", "circuit.reset_s", "circuit.window_s")
    ]


def test_an_integer_beyond_64_bits_is_refused(tmp_path: Path) -> None:
    # TOML's integers are 64-bit but tomllib reads any length: this one used to load, and
    # every round of the alert monitor then failed on alert_queue_depth * 0.9 (OverflowError).
    huge = "1" + "0" * 400
    text = MINIMAL + f"[worker]\nalert_queue_depth = {huge}\nalert_dead_letters = '{huge}'\n"
    text += f"[storage]\nspool_max_bytes = {2**63}\n[server]\nmax_body_bytes = {2**63 - 1}\n"

    assert problems(tmp_path, text) == [
        f"storage.spool_max_bytes: must be at most {2**63 - 1} (a 64-bit integer)",
        f"worker.alert_queue_depth: must be at most {2**63 - 1} (a 64-bit integer)",
        f"worker.alert_dead_letters: must be at most {2**63 - 1} (a 64-bit integer)",
    ]


def test_the_longest_durations_are_taken(tmp_path: Path) -> None:
    text = MINIMAL + "[worker]\nlease_s = 2_592_000\n"
    text = text.replace('url = "', 'backoff = { base_s = 2_592_000, max_s = 2_592_000 }\nurl = "')
    config = load(tmp_path, text)
    assert config.worker.lease_s == config.destinations[0].backoff.max_s == 30 * 86_400


def test_absurdly_nested_toml_is_a_located_issue_not_a_crash(tmp_path: Path) -> None:
    # tomllib parses nested arrays recursively and lets a RecursionError escape.
    path = write(tmp_path, "a = " + "[" * 5000 + "]" * 5000 + "\n")

    assert [str(i) for i in check_config(path, {})] == [
        f"{path}: invalid TOML: arrays or tables nested too deeply"
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    assert [str(i) for i in check_config(path, {})] == [f"{path}: file does not exist"]
    with pytest.raises(ConfigError):
        load_config(path, {})


# ── ${ENV} substitution and ESTAFETA_* overrides ──────────────────────────────────────────


def test_env_references_are_substituted_whole_and_embedded(tmp_path: Path) -> None:
    text = MINIMAL + dedent("""
        [storage]
        url = "postgresql://${PGUSER}@db.internal/estafeta"
        [worker]
        concurrency = "${WORKERS}"
    """)
    text = text.replace('api_key = "k-123"', 'api_key = "${HOOKS_KEY}"')
    env = {"PGUSER": "hub", "WORKERS": "8", "HOOKS_KEY": "k-from-env"}

    config = load(tmp_path, text, env)

    assert config.storage.url == "postgresql://hub@db.internal/estafeta"
    assert config.worker.concurrency == 8
    assert config.sources[0].api_key == "k-from-env"


def test_double_dollar_escapes_a_literal_reference(tmp_path: Path) -> None:
    text = MINIMAL.replace('url = "https://crm.example/hooks"', 'url = "https://x/$${NOT_ENV}"')
    assert load(tmp_path, text).destinations[0].url == "https://x/${NOT_ENV}"


def test_missing_env_variables_are_each_reported_at_their_key(tmp_path: Path) -> None:
    destination = DESTINATION + 'headers = { Authorization = "Bearer ${CRM_TOKEN}" }\n'
    text = (
        TENANT
        + SOURCE
        + destination
        + ROUTE
        + dedent("""
        [[sources]]
        id = "wa"
        tenant = "acme"
        kind = "whatsapp_cloud"
        app_secret = "${WA_APP_SECRET}"
        verify_token = "${WA_VERIFY_TOKEN"
        api_base = "${1BAD}"
    """)
    )

    assert problems(tmp_path, text) == [
        "sources[1].app_secret: environment variable WA_APP_SECRET is not set",
        "sources[1].verify_token: unterminated '${' (write '$${' for a literal '${')",
        "sources[1].api_base: invalid environment variable name '1BAD' in '${1BAD}'",
        "destinations[0].headers.Authorization: environment variable CRM_TOKEN is not set",
    ]


def test_a_problem_made_by_an_empty_variable_names_it(tmp_path: Path) -> None:
    # An empty variable is substituted as it is (docker compose passes `${X}` of a shell
    # where X is unset as ""): the error named only what the empty value broke.
    text = (
        TENANT
        + ROUTE
        + dedent("""
        [worker]
        concurrency = "${WORKERS}"

        [[sources]]
        id = "wa"
        tenant = "acme"
        kind = "whatsapp_cloud"
        app_secret = "${WA_APP_SECRET}"

        [[destinations]]
        id = "crm"
        tenant = "acme"
        url = "https://${CRM_HOST}${CRM_PATH}/hooks"
        secret = ["${NEW_SECRET}", "${OLD_SECRET}"]
    """)
    )
    env = {
        "WORKERS": "",
        "WA_APP_SECRET": "",
        "CRM_HOST": "",
        "CRM_PATH": "",
        "NEW_SECRET": WHSEC,
        "OLD_SECRET": "",
    }

    assert problems(tmp_path, text, env) == [
        "worker.concurrency: Input should be a valid integer, unable to parse string as an "
        "integer (environment variable WORKERS is empty)",
        "sources[0].app_secret: required for a whatsapp_cloud source "
        "(environment variable WA_APP_SECRET is empty)",
        "destinations[0].url: invalid URL: must start with http:// or https:// "
        "(environment variables CRM_HOST, CRM_PATH are empty)",
        "destinations[0].secret[1]: must not be empty (an unset or empty environment "
        "variable?) (environment variable OLD_SECRET is empty)",
    ]


def test_estafeta_variables_override_the_file(tmp_path: Path) -> None:
    text = MINIMAL + '[server]\nlisten = "127.0.0.1:1"\n[storage]\nurl = "sqlite:///file.db"'
    env = {
        "ESTAFETA_DATABASE_URL": "postgresql://hub@db/estafeta",
        "ESTAFETA_REDIS_URL": "redis://cache:6379/0",
        "ESTAFETA_LISTEN": "0.0.0.0:9000",
        "ESTAFETA_ADMIN_KEY": "admin-from-env",
        "ESTAFETA_MASTER_KEY": "master-from-env",
    }

    config = load(tmp_path, text, env)

    assert config.storage.url == "postgresql://hub@db/estafeta"
    assert config.redis.url == "redis://cache:6379/0"
    assert config.server.listen == "0.0.0.0:9000"
    assert config.security == SecurityConfig(
        admin_key="admin-from-env", master_key="master-from-env"
    )


def test_override_makes_a_missing_variable_in_the_file_harmless(tmp_path: Path) -> None:
    text = MINIMAL + '[security]\nadmin_key = "${ADMIN}"'
    config = load(tmp_path, text, {"ESTAFETA_ADMIN_KEY": "from-env"})
    assert config.security.admin_key == "from-env"


def test_empty_override_variable_is_ignored(tmp_path: Path) -> None:
    config = load(tmp_path, '[server]\nlisten = "127.0.0.1:1"', {"ESTAFETA_LISTEN": ""})
    assert config.server.listen == "127.0.0.1:1"


def test_an_invalid_override_is_reported_at_the_key_it_replaces(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL, {"ESTAFETA_REDIS_URL": "localhost:6379"}) == [
        "redis.url: invalid Redis URL: must start with redis://, rediss:// or unix:// "
        "(the value of ESTAFETA_REDIS_URL)"
    ]


# ── secrets stay out of logs ──────────────────────────────────────────────────────────────


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    secret_keys = {
        "generic": ["api_key"],
        "whatsapp_cloud": ["app_secret", "verify_token", "access_token"],
        "twilio": ["auth_token"],
        "zapi": ["token", "instance_token", "client_token"],
        "sendpulse": ["token", "client_secret"],
    }
    # The ids beside them, which a source that sends needs too.
    ids = {"whatsapp_cloud": {"phone_number_id": "1"}, "zapi": {"instance_id": "i"}}
    ids["sendpulse"] = {"client_id": "c", "bot_id": "b"}
    sources = [
        {"id": kind.replace("_", "-"), "tenant": "acme", "kind": kind}
        | {key: f"SECRET-{key}" for key in keys}
        | ids.get(kind, {})
        for kind, keys in secret_keys.items()
    ]
    sources[0]["secret"] = WHSEC
    sources[2]["public_url"] = "https://twilio:PUBLIC-PASSWORD@hub.example"  # basic auth
    data: dict[str, Any] = {
        "storage": {"url": "postgresql://hub:DB-PASSWORD@db/estafeta"},
        # redis-py reads the password up to the last `@`
        "redis": {"url": "redis://:REDIS@PASSWORD@cache:6379/0"},
        "security": {"admin_key": "ADMIN-KEY", "master_key": "MASTER-KEY"},
        "tenants": [{"id": "acme"}],
        "sources": sources,
        "destinations": [
            {
                "id": "d",
                "tenant": "acme",
                # a hook's credential: its password, its path (Zapier, Make), its query
                "url": "https://crm:HOOK-PASSWORD@hooks.example/catch/HOOK-TOKEN?key=HOOK-KEY",
                "secret": WHSEC,
                "headers": {"X-Api-Key": "HEADER-TOKEN"},
            }
        ],
    }

    config = load_config_dict(data, {})
    shown = repr(config) + str(config)

    for hidden in ["SECRET-", WHSEC, "DB-PASSWORD", "REDIS", "PASSWORD", "ADMIN-KEY", "MASTER-KEY"]:
        assert hidden not in shown
    for hidden in ["HOOK-TOKEN", "HOOK-KEY"]:
        assert hidden not in shown
    assert "HEADER-TOKEN" not in shown
    assert "postgresql://hub:***@db/estafeta" in shown
    in_query = load_config_dict({"storage": {"url": "postgresql:///e?user=h&password=QUERY-PW"}})
    assert "QUERY-PW" not in repr(in_query) and "password=***" in repr(in_query)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db.example:5432/estafeta?sslmode=require",  # as hosted services give it
        "postgresql://u@db/estafeta?ssl=verify-full",
        "postgresql:///estafeta?host=/var/run/postgresql&user=hub",  # a Unix socket
        "postgresql://hub@%2Fvar%2Frun%2Fpostgresql/estafeta",  # libpq's socket as the host
        "postgres://u:p%40ss%2Fw0rd@db.example/estafeta",  # Heroku's and Render's scheme
        "postgresql://postgres.abcdefgh:pw@pooler.example:6543/postgres?statement_cache_size=0",
        "postgresql://u@db1,db2:5433/estafeta?target_session_attrs=read-write",  # libpq's list
        "postgresql://u@/estafeta?host=db1&host=db2",
        "postgresql://u@[::1]:5433/estafeta",  # one IPv6 host, with its port
        "postgresql://u@db/estafeta?application_name=estafeta&connect_timeout=10"
        "&options=-c%20statement_timeout%3D30000",
        # An `@` in a parameter's value, as libpq takes it (the password check refused it).
        "postgresql://hub@db/estafeta?password=p@ss",
        "postgresql:///estafeta?host=db&user=admin@server",  # Azure's user@server login
        "postgresql://hub@db/estafeta?passfile=/home/ops@corp/.pgpass",
        "redis://cache:6379/0?socket_timeout=5",
        "rediss://cache:6380/0?ssl_cert_reqs=none",
    ],
)
def test_database_and_redis_urls_with_the_parameters_their_clients_take(
    tmp_path: Path, url: str
) -> None:
    table = "redis" if url.startswith("redis") else "storage"
    assert problems(tmp_path, f'[{table}]\nurl = "{url}"') == []


@pytest.mark.parametrize(
    "prefix", [":", "estafeta-staging:", "acme.prod:estafeta:", "a" * 63 + ":"]
)
def test_a_redis_key_prefix_of_its_own_for_each_deployment(tmp_path: Path, prefix: str) -> None:
    config = load(tmp_path, f'[redis]\nurl = "redis://cache:6379/0"\nkey_prefix = "{prefix}"')
    assert config.redis.key_prefix == prefix
    assert f"key_prefix='{prefix}'" in repr(config.redis)


def test_a_redis_password_with_a_slash_is_not_quoted_as_its_port(tmp_path: Path) -> None:
    assert problems(tmp_path, '[redis]\nurl = "redis://:Pass/Word@cache:6379/0"') == [
        "redis.url: invalid Redis URL: write a '/', '?', '#' or '@' of its user or password"
        " percent-encoded (%2F, %3F, %23, %40)"
    ]


def test_an_invalid_secret_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    text = TENANT + SOURCE + 'secret = "whsec_TOP-SECRET"'
    assert not any("TOP-SECRET" in line for line in problems(tmp_path, text))


def test_an_invalid_url_is_echoed_without_its_credentials_or_path(tmp_path: Path) -> None:
    # `check-config` and every command print this at start-up, to a terminal or a CI log; a
    # hook URL often carries its credentials (user:password@) or a token in its path.
    url = "ftp://crm:DEST-PASSWORD@crm.example:2121/hooks/PATH-TOKEN?key=QUERY-TOKEN"
    text = TENANT + DESTINATION.replace("https://crm.example/hooks", url)
    assert problems(tmp_path, text) == [
        "destinations[0].url: invalid URL 'ftp://crm.example:2121/…': "
        "must start with http:// or https://"
    ]


# ── config.example.toml ───────────────────────────────────────────────────────────────────


def test_example_file_is_valid() -> None:
    assert check_config(EXAMPLE, EXAMPLE_ENV) == []

    config = load_config(EXAMPLE, EXAMPLE_ENV)

    wa = config.source("wa-sol")
    assert wa is not None
    assert (wa.app_secret, wa.verify_token) == ("wa-app-secret", "wa-verify")
    assert config.route_ids() == ["text-to-crm", "route-1"]
    assert config.routes[0].filter == "data.kind == 'text'"


def test_example_file_states_the_true_defaults() -> None:
    config = load_config(EXAMPLE, EXAMPLE_ENV)
    crm = config.destination("crm")
    assert crm is not None

    assert config.server == ServerConfig()
    assert config.storage == StorageConfig()
    assert config.redis == RedisConfig()
    assert config.worker == WorkerConfig()
    assert crm.backoff == BackoffConfig()
    assert crm.circuit == CircuitConfig()
    defaults = DestinationConfig(id="x", tenant="x", url="https://x")
    assert (crm.effective_timeout_s(120), crm.max_attempts) == (
        defaults.effective_timeout_s(120),
        defaults.max_attempts,
    )
    assert config.tenants[0].ingress_rate_limit == TenantConfig(id="x").ingress_rate_limit


@pytest.mark.parametrize(
    "model",
    [
        ServerConfig,
        StorageConfig,
        RedisConfig,
        WorkerConfig,
        SecurityConfig,
        TenantConfig,
        SourceConfig,
        BackoffConfig,
        CircuitConfig,
        DestinationConfig,
        RouteConfig,
    ],
)
def test_example_file_mentions_every_key(model: type[BaseModel]) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = [field.alias or name for name, field in model.model_fields.items()]
    missing = [key for key in keys if not re.search(rf"(?<![\w.]){key}(?!\w)", text)]
    assert missing == []


def test_a_destination_without_timeout_gets_its_kinds_default_under_the_ceiling() -> None:
    from estafeta.config import DestinationConfig

    http = DestinationConfig(id="a", tenant="t", kind="http", url="http://127.0.0.1/x")
    assert http.effective_timeout_s(120) == 30
    assert http.effective_timeout_s(5) == 5  # the workers' ceiling wins
    sender = DestinationConfig(id="b", tenant="t", kind="whatsapp_send")
    assert sender.effective_timeout_s(120) == 10
    calendar = DestinationConfig(id="c", tenant="t", kind="google_calendar")
    assert calendar.effective_timeout_s(120) == 15
    explicit = DestinationConfig(id="d", tenant="t", kind="http", url="http://x/", timeout_s=3)
    assert explicit.effective_timeout_s(120) == 3


def test_the_api_source_id_is_reserved() -> None:
    data = {
        "tenants": [{"id": "t"}],
        "sources": [{"id": "api", "tenant": "t", "kind": "generic", "api_key": "k"}],
    }
    with pytest.raises(ConfigError) as failed:
        load_config_dict(data)
    assert "sources[0].id: 'api' is reserved for events published through the API" in str(
        failed.value
    )


TWILIO_SOURCES = """
[[tenants]]
id = "acme"

[[sources]]
id = "tw"
tenant = "acme"
kind = "twilio"
auth_token = "t"

[[sources]]
id = "tw-own"
tenant = "acme"
kind = "twilio"
auth_token = "t"
public_url = "https://own.example.com"

[[sources]]
id = "zapi"
tenant = "acme"
kind = "zapi"
token = "z"
"""


def test_a_twilio_source_without_a_public_url_takes_the_servers(tmp_path: Path) -> None:
    text = '[server]\npublic_url = "https://hooks.example.com"\n' + TWILIO_SOURCES
    config = load(tmp_path, text)
    urls = {s.id: s.public_url for s in config.sources}
    assert urls == {
        "tw": "https://hooks.example.com",
        "tw-own": "https://own.example.com",
        "zapi": None,
    }
    assert load(tmp_path, TWILIO_SOURCES).source("tw").public_url is None  # type: ignore[union-attr]


def test_a_public_url_naming_the_sources_own_path_is_refused(tmp_path: Path) -> None:
    # `/in/{id}` is appended: this one made every webhook's signed URL `…/in/tw/in/tw`, each
    # refused with a hint to set the public_url that was set.
    text = TWILIO_SOURCES.replace(
        '"https://own.example.com"', '"https://own.example.com/in/tw-own/"'
    )
    assert problems(tmp_path, text) == [
        "sources[1].public_url: is where the hub is reached, without /in/tw-own (it is appended)"
    ]
    behind = TWILIO_SOURCES.replace('.com"', '.com/estafeta/in/"')  # a prefix of a proxy's
    assert load(tmp_path, behind).source("tw-own").public_url == (  # type: ignore[union-attr]
        "https://own.example.com/estafeta/in/"
    )


def test_a_bad_server_public_url_is_reported_once_where_it_was_written(tmp_path: Path) -> None:
    text = '[server]\npublic_url = "hooks.example.com"\n' + TWILIO_SOURCES
    found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith("server.public_url: invalid URL"), found


def test_a_header_named_twice_in_other_cases_is_refused(tmp_path: Path) -> None:
    # Header names are sent lowercased: `X-A` and `x-a` silently became one header, the
    # other value lost, whichever TOML kept last.
    text = TENANT + DESTINATION + 'headers = { "X-Api-Key" = "one", "x-api-key" = "two" }'
    assert problems(tmp_path, text) == [
        "destinations[0].headers: header 'x-api-key' is also written as 'X-Api-Key': header"
        " names ignore case, keep one"
    ]
    distinct = TENANT + DESTINATION + 'headers = { "X-Api-Key" = "one", "X-Other" = "two" }'
    assert problems(tmp_path, distinct) == []


def test_a_public_url_with_a_query_or_fragment_is_refused(tmp_path: Path) -> None:
    # `/in/{id}` is appended: `https://own.example.com/?a=b` made every webhook's signed URL
    # `…/?a=b/in/tw-own`, never the one Twilio called, so every webhook was refused.
    for url in ("https://own.example.com/?a=b", "https://own.example.com/#top"):
        text = TWILIO_SOURCES.replace('"https://own.example.com"', f'"{url}"')
        found = problems(tmp_path, text)
        assert found == [
            "sources[1].public_url: must have no query (?…) or fragment (#…): "
            "/in/{source} is appended to it"
        ], found
    server = '[server]\npublic_url = "https://hooks.example.com/?a=b"\n' + TWILIO_SOURCES
    assert problems(tmp_path, server) == [
        "server.public_url: must have no query (?…) or fragment (#…): "
        "/in/{source} is appended to it"
    ]


def test_an_empty_event_type_is_refused(tmp_path: Path) -> None:
    # Taken as "not set": every body without a "type" was refused at run time, the file
    # passed check-config.
    for empty in ("", "  "):
        assert problems(tmp_path, TENANT + SOURCE + f'event_type = "{empty}"\n') == [
            "sources[0].event_type: must not be empty"
        ]


class _Compared(str):
    """A tenant id that counts how often it is compared for equality."""

    __slots__ = ()
    comparisons = 0

    def __eq__(self, other: object) -> bool:
        _Compared.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_checking_a_large_configuration_takes_time_in_proportion_to_its_size() -> None:
    """A hosting provider's file: hundreds of tenants, each with its destinations and routes.
    Each route's destinations were checked against every destination of the file, and each
    entry's tenant against every tenant: 3.4 s to load 600 clinics' configuration, 4 times
    what 300 took. Now a few comparisons per entry, however many others there are."""
    tenants = 300
    data: dict[str, Any] = {"tenants": [], "destinations": [], "routes": []}
    for t in range(tenants):
        tenant = f"clinic-{t}"
        data["tenants"].append({"id": _Compared(tenant), "name": tenant})
        data["destinations"] += [
            {"id": f"{tenant}-{d}", "tenant": _Compared(tenant), "url": f"https://{d}.example"}
            for d in ("crm", "billing")
        ]
        data["routes"] += [
            {
                "id": f"{tenant}-{d}",
                "tenant": _Compared(tenant),
                "events": ["*"],
                "destinations": [f"{tenant}-{d}"],
            }
            for d in ("crm", "billing")
        ]
    _Compared.comparisons = 0
    config = load_config_dict(data, env={})
    assert len(config.routes) == 2 * tenants
    entries = sum(len(entries) for entries in data.values())
    assert _Compared.comparisons <= 10 * entries


# ── TLS files of a destination ─────────────────────────────────────────────────────────────


def tls_destination(url: str = "https://crm.clinic.example/hooks", **keys: str) -> str:
    """MINIMAL with the destination's `url` and TLS keys as given (paths quoted as TOML)."""
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    destination = DESTINATION.replace('"https://crm.example/hooks"', json.dumps(url)) + lines
    return TENANT + SOURCE + destination + ROUTE


def test_a_destination_with_a_private_ca_and_a_client_certificate_loads(
    tmp_path: Path, certificates: Certificates
) -> None:
    config = load(
        tmp_path,
        tls_destination(
            tls_ca_file=str(certificates.ca),
            tls_client_cert=str(certificates.client.cert),
            tls_client_key=str(certificates.encrypted_key),
            tls_client_key_password="s3cret",
        ),
    )
    crm = config.destination("crm")
    assert crm is not None and crm.tls_context() is not None
    assert "s3cret" not in repr(config)


def test_a_key_in_the_certificates_file_needs_no_tls_client_key(
    tmp_path: Path, certificates: Certificates
) -> None:
    both = tmp_path / "client-and-key.pem"
    both.write_bytes(certificates.client.cert.read_bytes() + certificates.client.key.read_bytes())
    assert problems(tmp_path, tls_destination(tls_client_cert=str(both))) == []


def test_unusable_tls_files_are_located_errors(tmp_path: Path, certificates: Certificates) -> None:
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a not a PEM file")
    client, server = certificates.client, certificates.server
    cases = {
        "tls_ca_file": {"tls_ca_file": str(missing)},
        "tls_ca_file ": {"tls_ca_file": str(tmp_path)},
        "tls_ca_file  ": {"tls_ca_file": str(not_pem)},
        "tls_ca_file   ": {"tls_ca_file": str(client.key)},
        "tls_client_cert": {"tls_client_cert": str(client.key), "tls_client_key": str(client.key)},
        "tls_client_cert ": {"tls_client_cert": str(client.cert)},
        "tls_client_key": {"tls_client_cert": str(client.cert), "tls_client_key": str(server.key)},
        "tls_client_key ": {
            "tls_client_cert": str(client.cert),
            "tls_client_key": str(certificates.encrypted_key),
        },
        "tls_client_key_password": {
            "tls_client_cert": str(client.cert),
            "tls_client_key": str(certificates.encrypted_key),
            "tls_client_key_password": "wrong",
        },
        "tls_client_key  ": {"tls_client_key": str(client.key)},
        "tls_client_key_password ": {"tls_client_key_password": "s3cret"},
    }
    found = {label: problems(tmp_path, tls_destination(**keys)) for label, keys in cases.items()}
    here = "destinations[0]."
    assert found == {
        "tls_ca_file": [f"{here}tls_ca_file: file {str(missing)!r} does not exist"],
        "tls_ca_file ": [f"{here}tls_ca_file: {str(tmp_path)!r} is a directory, not a PEM file"],
        "tls_ca_file  ": [f"{here}tls_ca_file: {str(not_pem)!r} holds no PEM certificate"],
        "tls_ca_file   ": [f"{here}tls_ca_file: {str(client.key)!r} holds no PEM certificate"],
        "tls_client_cert": [f"{here}tls_client_cert: {str(client.key)!r} holds no PEM certificate"],
        "tls_client_cert ": [
            f"{here}tls_client_cert: {str(client.cert)!r} (and tls_client_key is not set) "
            "holds no PEM private key"
        ],
        "tls_client_key": [
            f"{here}tls_client_key: the key in {str(server.key)!r} does not belong to the "
            f"certificate in {str(client.cert)!r}"
        ],
        "tls_client_key ": [
            f"{here}tls_client_key: the key in {str(certificates.encrypted_key)!r} is "
            "encrypted: set tls_client_key_password"
        ],
        "tls_client_key_password": [
            f"{here}tls_client_key_password: cannot decrypt the key in "
            f"{str(certificates.encrypted_key)!r}: wrong password?"
        ],
        "tls_client_key  ": [
            f"{here}tls_client_key: needs tls_client_cert, the certificate of this key"
        ],
        "tls_client_key_password ": [
            f"{here}tls_client_key_password: there is no tls_client_cert whose key it opens"
        ],
    }
    # A key's contents never reach a message.
    key_text = client.key.read_text().splitlines()[1]
    assert not any(key_text in line for lines in found.values() for line in lines)


def test_tls_files_on_a_plain_http_url_are_refused(
    tmp_path: Path, certificates: Certificates
) -> None:
    text = tls_destination("http://crm.clinic.example/hooks", tls_ca_file=str(certificates.ca))
    assert problems(tmp_path, text) == [
        "destinations[0].tls_ca_file: the url is not https://: nothing is sent over TLS"
    ]
