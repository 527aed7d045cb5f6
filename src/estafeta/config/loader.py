"""Reading a configuration: TOML → `${ENV}` substitution → env overrides → validation.

Every problem found is collected and raised together as one `ConfigError`, each as a
`ConfigIssue` whose location points at the key (`routes[2].destinations[0]`), so an operator
fixes the whole file in one pass instead of one error per restart.

`${NAME}` anywhere in a string value is replaced by the environment variable NAME; `$${`
writes a literal `${`. Substitution happens before validation, so `concurrency = "${N}"`
works for numbers too. The `ESTAFETA_*` variables in `ENV_OVERRIDES` then replace their key
(an empty variable is treated as unset), and a command's options theirs (`serve --listen`).
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import stat
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from estafeta.config.models import (
    FIELD_ERROR,
    ROUTING_NUMBER_KEYS,
    SOURCE_KEYS,
    Config,
    DestinationKind,
    default_route_id,
    destination_key_missing,
    header_problems,
    outbound_keys_missing,
    routing_number,
    source_key_missing,
)
from estafeta.errors import ConfigError, ConfigIssue

__all__ = [
    "ENV_OVERRIDES",
    "check_config",
    "load_config",
    "load_config_dict",
    "read_config_file",
    "resolve_env",
]

#: Environment variable → (table, key) it overrides (DESIGN §3.2).
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "ESTAFETA_DATABASE_URL": ("storage", "url"),
    "ESTAFETA_REDIS_URL": ("redis", "url"),
    "ESTAFETA_LISTEN": ("server", "listen"),
    "ESTAFETA_ADMIN_KEY": ("security", "admin_key"),
    "ESTAFETA_MASTER_KEY": ("security", "master_key"),
}

_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<name>[^}]*)(?P<close>\}?)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")
_SECTIONS = list(Config.model_fields)

Loc = tuple[str | int, ...]


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and check the TOML file at `path`; raise `ConfigError` listing every problem."""
    return load_config_dict(read_config_file(path), env)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TOML file at `path` as parsed, unchecked; `ConfigError` when it cannot be read,
    naming the file as it was written (`./estafeta.toml`, not Path's `estafeta.toml`)."""
    name = str(path)
    if not name:  # Path("") is the working directory: "cannot read: Is a directory"
        raise ConfigError([ConfigIssue("''", "an empty path names no file")])
    try:
        return tomllib.loads(_read_file(name).decode())
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(name, "file does not exist")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_issue(name, exc)]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(name, "file is not valid UTF-8")]) from None
    except RecursionError:  # tomllib recurses per `[` / `{` and has no limit of its own
        issue = ConfigIssue(name, "invalid TOML: arrays or tables nested too deeply")
        raise ConfigError([issue]) from None
    except OSError as exc:
        raise ConfigError([ConfigIssue(name, f"cannot read: {exc.strerror}")]) from None


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # far past any real configuration


def _read_file(name: str) -> bytes:
    """The bytes of the file `name`, at most MAX_CONFIG_BYTES: a device (/dev/zero) or a
    file past the limit would fill memory. A pipe is read (`--config <(envsubst < t)`),
    but opened non-blocking: a FIFO with no writer hung open(2)."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise ConfigError([ConfigIssue(name, "not a file (a device or a socket)")])
        os.set_blocking(fd, True)  # a pipe's writer may not have written yet
        data = file.read(MAX_CONFIG_BYTES + 1)
        if not data and stat.S_ISFIFO(mode):
            # Not an empty file's defaults: most likely nothing writes to it.
            raise ConfigError([ConfigIssue(name, "a pipe that gave nothing (no writer?)")])
    if len(data) > MAX_CONFIG_BYTES:
        too_big = f"larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a configuration file"
        raise ConfigError([ConfigIssue(name, too_big)])
    return data


def resolve_env(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`data` as the configuration will see it: `${NAME}` substituted and the `ESTAFETA_*`
    overrides applied, unchecked (a missing variable is left as written). For checks that
    must judge the values `serve` runs with, not the text of the file."""
    env = os.environ if env is None else env
    resolved: dict[str, Any] = _substitute(dict(data), (), env, [], {})
    _apply_overrides(resolved, env)
    return resolved


def load_config_dict(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    options: Mapping[str, tuple[str, str]] | None = None,
) -> Config:
    """Check an already-parsed configuration (e.g. one built in code); `data` is not changed.

    `options`: a command's options that replace a key, over the file and the environment,
    as `{"--listen": ("server.listen", value)}`. Replaced before validation, as the
    `ESTAFETA_*` variables are: the value an option replaces need not be valid.
    """
    env = os.environ if env is None else env
    env_issues: list[ConfigIssue] = []
    empties: dict[str, list[str]] = {}  # location → the empty variables substituted there
    resolved = _substitute(dict(data), (), env, env_issues, empties)
    overridden = _apply_overrides(resolved, env)
    for option, (location, value) in (options or {}).items():
        table, key = location.split(".")
        if _replace(resolved, table, key, value):
            overridden[location] = option
    # A `${VAR}` the environment overrides anyway is not worth failing for.
    env_issues = [issue for issue in env_issues if issue.location not in overridden]
    issues: list[ConfigIssue] = []
    config: Config | None = None
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:
        issues.extend(_pydantic_issue(error) for error in exc.errors())
    issues.extend(_reference_issues(resolved))
    # A bad value that came from the environment: say so, or the file gets searched for it.
    issues = [
        ConfigIssue(i.location, f"{i.message} (the value of {overridden[i.location]})")
        if i.location in overridden
        else ConfigIssue(i.location, f"{i.message} ({_empty(empties[i.location])})")
        if i.location in empties
        else i
        for i in issues
    ]
    if env_issues or issues or config is None:
        raise ConfigError(_tidy(env_issues, issues))
    return config


def check_config(path: str | Path, env: Mapping[str, str] | None = None) -> list[ConfigIssue]:
    """Every problem in the file at `path`, `[]` when it is valid; never raises for a bad file."""
    try:
        load_config(path, env)
    except ConfigError as exc:
        return exc.issues
    return []


def _toml_issue(path: str, exc: tomllib.TOMLDecodeError) -> ConfigIssue:
    """`Expected '=' ... (at line 3, column 5)` → location `FILE:line 3, column 5`."""
    message = str(exc)
    position = _TOML_POSITION.search(message)
    if position is None:
        return ConfigIssue(str(path), f"invalid TOML: {message}")
    line, column = position.groups()
    where = f"line {line}, column {column}" if line else "end of file"
    return ConfigIssue(f"{path}:{where}", f"invalid TOML: {message[: position.start()]}")


def _location(loc: Loc) -> str:
    """`("routes", 2, "destinations", 0)` → `routes[2].destinations[0]`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _substitute(
    value: Any,
    loc: Loc,
    env: Mapping[str, str],
    issues: list[ConfigIssue],
    empties: dict[str, list[str]],
) -> Any:
    """A copy of `value` with `${NAME}` replaced in every string, recording missing names,
    and in `empties` the variables set but empty, by location: substituted as they are (as
    a shell would), they are named beside what they break."""
    if isinstance(value, dict):
        return {
            key: _substitute(item, (*loc, key), env, issues, empties) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_substitute(item, (*loc, i), env, issues, empties) for i, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group("name")
        if not match.group("close"):
            problem = "unterminated '${' (write '$${' for a literal '${')"
        elif not _ENV_NAME.fullmatch(name):
            problem = f"invalid environment variable name {name!r} in '${{{name}}}'"
        elif name in env:
            if not env[name]:  # e.g. docker compose's `X: ${X}` where X is unset
                empties.setdefault(_location(loc), []).append(name)
            return env[name]
        else:
            problem = f"environment variable {name} is not set"
        issues.append(ConfigIssue(_location(loc), problem))
        return match.group(0)

    return _REFERENCE.sub(replace, value)


def _empty(names: list[str]) -> str:
    """`environment variable A is empty`, or `environment variables A, B are empty`."""
    unique = list(dict.fromkeys(names))
    if len(unique) == 1:
        return f"environment variable {unique[0]} is empty"
    return f"environment variables {', '.join(unique)} are empty"


def _apply_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply `ENV_OVERRIDES` in place; return the locations they replaced, each with the
    variable that did."""
    replaced: dict[str, str] = {}
    for variable, (table, key) in ENV_OVERRIDES.items():
        value = env.get(variable)
        if value and _replace(data, table, key, value):
            replaced[f"{table}.{key}"] = variable
    return replaced


def _replace(data: dict[str, Any], table: str, key: str, value: str) -> bool:
    """Set `data[table][key]` in place; False when `table` is not a table (validation
    reports its type)."""
    section = data.setdefault(table, {})
    if not isinstance(section, dict):
        return False
    section[key] = value
    return True


def _pydantic_issue(error: ErrorDetails) -> ConfigIssue:
    """Translate one pydantic error into the location and words an operator expects."""
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    message = error["msg"]
    if kind == FIELD_ERROR:
        message = str(ctx["message"])
        loc = (*loc, ctx["field"]) if "field" in ctx else loc
    elif kind in ("value_error", "assertion_error") and "error" in ctx:
        message = str(ctx["error"])
    elif kind == "extra_forbidden":
        key = str(loc[-1])
        message = f"unknown key {key!r}" + _did_you_mean(key, _keys_at(loc[:-1]))
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "too_short" and ctx.get("min_length") == 1:
        message = "must not be empty"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "must be a table"
        if len(loc) == 1 and isinstance(error["input"], list):  # `[[worker]]`
            message += f": write [{loc[0]}], not [[{loc[0]}]]"
    elif kind == "list_type":
        message = "must be an array"
        if len(loc) == 1 and isinstance(error["input"], dict):  # `[tenants]`
            message += f" of tables: write [[{loc[0]}]], not [{loc[0]}]"
    return ConfigIssue(_location(loc), message)


def _keys_at(loc: Loc) -> list[str]:
    """The keys allowed in the table at `loc`, found by walking the models' annotations."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap_optional(annotation)
        if isinstance(part, int):
            annotation = next(iter(typing.get_args(annotation)), None)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next((f for n, f in _fields(annotation) if n == part), None)
            annotation = field.annotation if field else None
        else:
            return []
    annotation = _unwrap_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [name for name, _ in _fields(annotation)]
    return []


def _fields(model: type[BaseModel]) -> Iterator[tuple[str, Any]]:
    """(key as written in TOML, field) for each field of `model`."""
    for name, field in model.model_fields.items():
        yield field.alias or name, field


def _unwrap_optional(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def _entries(data: Mapping[str, Any], section: str) -> list[tuple[int, dict[str, Any]]]:
    """The tables of an array such as `[[sources]]`; malformed ones are reported elsewhere."""
    items = data.get(section)
    if not isinstance(items, list):
        return []
    return [(i, item) for i, item in enumerate(items) if isinstance(item, dict)]


def _text(entry: Mapping[str, Any], key: str) -> str | None:
    value = entry.get(key)
    return value if isinstance(value, str) else None


def _reference_issues(data: Mapping[str, Any]) -> list[ConfigIssue]:
    """Checks across entries, done on the raw data so they run even when an entry is invalid."""
    tenants = [t for _, entry in _entries(data, "tenants") if (t := _text(entry, "id"))]
    return [
        *_duplicate_issues(data),
        *_unknown_tenant_issues(data, tenants),
        *_route_destination_issues(data, tenants),
        *_missing_key_issues(data),
        *_shared_number_issues(data),
    ]


def _missing_key_issues(data: Mapping[str, Any]) -> Iterator[ConfigIssue]:
    """The keys an entry's kind cannot do without, and each of a destination's headers at
    fault, looked for in the raw table: pydantic checks them only once every other key of
    the entry is valid, and a validator reports one problem only. On a valid entry the model
    says the first of them too, and `_tidy` keeps one."""
    for i, entry in _entries(data, "sources"):
        kind = entry.get("kind")
        if not isinstance(kind, str) or kind not in SOURCE_KEYS:
            continue
        if (missing := source_key_missing(kind, entry)) is not None:
            key, message = missing
            wanted = [key] if key else ["secret", "api_key"]
            if not _misspelt(entry, ("sources", i), wanted):
                yield ConfigIssue(f"sources[{i}]" + (f".{key}" if key else ""), message)
        for key, message in outbound_keys_missing(kind, entry.get("id"), entry):
            if not _misspelt(entry, ("sources", i), [key]):
                yield ConfigIssue(f"sources[{i}].{key}", message)
    kinds = typing.get_args(DestinationKind)
    for i, entry in _entries(data, "destinations"):
        kind = entry.get("kind", "http")
        if not isinstance(kind, str) or kind not in kinds:
            continue
        found = destination_key_missing(kind, entry)
        if found is not None and not _misspelt(entry, ("destinations", i), [found[0]]):
            yield ConfigIssue(f"destinations[{i}].{found[0]}", found[1])
        headers = entry.get("headers")
        for problem in header_problems(headers) if isinstance(headers, dict) else []:
            yield ConfigIssue(f"destinations[{i}].headers", problem)


def _misspelt(entry: Mapping[str, Any], loc: Loc, wanted: list[str]) -> bool:
    """Whether an unknown key of the entry is one of `wanted` misspelt (`urll`): reported
    as that, with its "did you mean", not a second time as missing."""
    unknown = set(entry) - set(_keys_at(loc))
    return any(difflib.get_close_matches(key, wanted, n=3) for key in unknown)


def _duplicate_issues(data: Mapping[str, Any]) -> Iterator[ConfigIssue]:
    for section in ("tenants", "sources", "destinations", "routes"):
        first: dict[str, str] = {}
        for i, entry in _entries(data, section):
            entry_id = _text(entry, "id")
            if section == "routes" and entry.get("id") is None:
                entry_id = default_route_id(i)
            if entry_id is None:
                continue
            here = f"{section}[{i}]"
            if entry_id in first:
                where = f"{here}.id" if "id" in entry else here
                yield ConfigIssue(where, f"duplicate id {entry_id!r} (first at {first[entry_id]})")
            else:
                first[entry_id] = here


def _shared_number_issues(data: Mapping[str, Any]) -> Iterator[ConfigIssue]:
    """A number in two sources: which of them got its events (and its tenant) was arbitrary."""
    first: dict[tuple[str, str], str] = {}
    for i, entry in _entries(data, "sources"):
        kind = entry.get("kind")
        key = ROUTING_NUMBER_KEYS.get(kind) if isinstance(kind, str) else None
        value = _text(entry, key) if key else None
        if not isinstance(kind, str) or key is None or not value:
            continue
        number = (kind, routing_number(kind, value))
        here = f"sources[{i}].{key}"
        if number in first:
            yield ConfigIssue(
                here,
                f"{value!r} is also at {first[number]}: one number is one source (its "
                "webhooks go to the source that has it)",
            )
        else:
            first.setdefault(number, here)


def _unknown_tenant_issues(data: Mapping[str, Any], tenants: list[str]) -> Iterator[ConfigIssue]:
    hint_none = " (no [[tenants]] are defined)"
    known = set(tenants)  # not the list: a file of hundreds of tenants checked in n², slowly
    for section in ("sources", "destinations", "routes"):
        for i, entry in _entries(data, section):
            tenant = _text(entry, "tenant")
            if tenant is not None and tenant not in known:
                hint = _did_you_mean(tenant, tenants) if tenants else hint_none
                yield ConfigIssue(f"{section}[{i}].tenant", f"unknown tenant {tenant!r}{hint}")


def _route_destination_issues(data: Mapping[str, Any], tenants: list[str]) -> Iterator[ConfigIssue]:
    """Each route destination must exist and belong to the route's own tenant."""
    owner: dict[str, str | None] = {}
    for _, entry in _entries(data, "destinations"):
        if (dest_id := _text(entry, "id")) is not None:
            owner.setdefault(dest_id, _text(entry, "tenant"))
    # Each tenant's destinations, listed once: per route, a file of hundreds of tenants was
    # checked in routes × destinations.
    owned: dict[str | None, list[str]] = {}
    for dest_id, dest_tenant in owner.items():
        owned.setdefault(dest_tenant, []).append(dest_id)
    known = set(tenants)
    for i, route in _entries(data, "routes"):
        tenant = _text(route, "tenant")
        names = route.get("destinations")
        if not isinstance(names, list):
            continue
        known_tenant = tenant in known  # an unknown tenant is reported on its own
        for j, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                continue  # reported by validation
            where = f"routes[{i}].destinations[{j}]"
            if name not in owner:
                own = owned.get(tenant, []) if known_tenant else list(owner)
                yield ConfigIssue(where, f"unknown destination {name!r}{_did_you_mean(name, own)}")
            elif known_tenant and owner[name] != tenant:
                message = f"destination {name!r} belongs to tenant {owner[name]!r}, not {tenant!r}"
                yield ConfigIssue(where, message)


def _tidy(env_issues: list[ConfigIssue], issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """Drop repeats and the consequences of an unresolved `${VAR}`; order as in the file.

    A key whose `${VAR}` is missing still holds the literal `${VAR}`, which would also fail
    validation (`not a whsec_ secret`); that second complaint would only mislead.
    """
    unresolved = {issue.location for issue in env_issues}

    def shadowed(issue: ConfigIssue) -> bool:
        return any(
            issue.location == loc or issue.location.startswith((f"{loc}.", f"{loc}["))
            for loc in unresolved
        )

    unique = list(dict.fromkeys([*env_issues, *(i for i in issues if not shadowed(i))]))

    def file_order(issue: ConfigIssue) -> tuple[int, int]:
        match = re.match(r"([a-z_]+)(?:\[(\d+)\])?", issue.location)
        if match is None or match.group(1) not in _SECTIONS:
            return (-1, 0)
        return (_SECTIONS.index(match.group(1)), int(match.group(2) or 0))

    return sorted(unique, key=file_order)
