"""Every provider's webhooks (and the generic source's), mutated, signed correctly, through
the real ingest endpoint on both engines: whatever a provider (or someone holding its
secret) sends, the answer is a stored event or a clear 4xx, never a 500 that the provider
would retry forever.

The mutations are seeded, so a failure names a case that reproduces: each one replaces,
removes or adds values at random places of a real fixture, with values chosen to break
assumptions (wrong types, NULs, huge numbers, very long text, deep nesting).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

from estafeta.ingress.endpoint import EMPTY_TWIML
from estafeta.ingress.providers.twilio import signature as twilio_signature
from tests.conftest import signed
from tests.integration.providers_support import (
    FIXTURES,
    SENDPULSE_TOKEN,
    TWILIO_VECTOR,
    WA_VECTOR,
    ZAPI_TOKEN,
)

CASES_PER_FIXTURE = 40

NASTY: list[Any] = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "x" * 300,
    "9" * 70,
    "+55 (11) 98765-4321",
    "whatsapp:+5511987654321",
    "12345678901234567890123",
    "😀" * 80,
    "\u202eevil",
    "\\u0000",
    "1e999",
    "NaN",
    "-1",
    "<script>alert(1)</script>",
    -1,
    0,
    2**63 - 1,
    2**63,
    2**80,
    -(2**70),
    1.5e308,
    -0.0,
    0.1,
    True,
    False,
    None,
    [],
    {},
    [None, 1, "a"],
    {"id": None, "from": [], "timestamp": {}},
    [[[[[[[[[[[]]]]]]]]]]],
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document that holds a value (keys of objects, list items)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


def mutated(doc: Any, rng: random.Random) -> Any:
    """A copy of `doc` with one to three values replaced, removed, added or repeated."""
    doc = json.loads(json.dumps(doc))
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(doc))
        if not paths:
            return rng.choice(NASTY)
        path = rng.choice(paths)
        parent, last = _parent(doc, path), path[-1]
        action = rng.random()
        if action < 0.6:
            parent[last] = rng.choice(NASTY)
        elif action < 0.75:
            del parent[last]
        elif action < 0.9 and isinstance(parent, dict):
            parent[rng.choice(["id", "type", "from", "status", "x"])] = rng.choice(NASTY)
        elif isinstance(parent, list):
            parent.extend([parent[last]] * rng.randint(2, 30))
        else:
            parent[last] = json.loads(json.dumps(doc))  # the document inside itself
    return doc


# Where the fixtures keep the ids that key an event: each case makes them its own, so that
# its mutations reach the store instead of being answered as duplicates of the first case.
ID_KEYS = {"id", "ids", "messageId", "zaapId", "MessageSid", "SmsSid", "SmsMessageSid"}


def with_own_ids(doc: Any, case: str) -> Any:
    """`doc` with every id under ID_KEYS suffixed with the case's name."""
    if isinstance(doc, list):
        return [with_own_ids(item, case) for item in doc]
    if not isinstance(doc, dict):
        return doc
    own: dict[str, Any] = {}
    for key, value in doc.items():
        if key in ID_KEYS and isinstance(value, str):
            own[key] = f"{value}-{case}"
        elif key in ID_KEYS and isinstance(value, list):
            own[key] = [f"{v}-{case}" if isinstance(v, str) else v for v in value]
        else:
            own[key] = with_own_ids(value, case)
    return own


def _fixtures(folder: str, suffix: str) -> list[Path]:
    return sorted((FIXTURES / folder).glob(f"*{suffix}"))


def _json_fixtures(folder: str) -> list[str]:
    return [path.name for path in _fixtures(folder, ".json") if "vector" not in path.name]


def _problem(r: httpx.Response, case: str) -> str | None:
    """What is wrong with an answer, or None: a 5xx, or a body that says nothing."""
    if r.status_code >= 500:
        return f"{case}: {r.status_code} {r.text}"
    if r.status_code < 400 and r.headers["content-type"].startswith("text/xml"):  # Twilio's
        return None if r.text == EMPTY_TWIML else f"{case}: TwiML that replies: {r.text}"
    body = r.json()
    if r.status_code >= 400 and not (body.get("error") and body.get("detail")):
        return f"{case}: {r.status_code} without error and detail: {r.text}"
    if r.status_code < 400 and "id" not in body and "events" not in body:
        return f"{case}: {r.status_code} without the events stored: {r.text}"
    return None


async def _fuzz(post: Callable[[random.Random, str], Awaitable[httpx.Response]], name: str) -> None:
    """`post` each case (a random source seeded by the case's name, and the name)."""
    problems = []
    for seed in range(CASES_PER_FIXTURE):
        case = f"{name}#{seed}"
        problem = _problem(await post(random.Random(case), case), case)
        if problem:
            problems.append(problem)
    assert problems == []


@pytest.mark.parametrize("name", _json_fixtures("whatsapp_cloud"))
async def test_whatsapp_cloud(http: httpx.AsyncClient, name: str) -> None:
    original = json.loads((FIXTURES / "whatsapp_cloud" / name).read_bytes())

    async def post(rng: random.Random, case: str) -> httpx.Response:
        body = json.dumps(mutated(with_own_ids(original, case), rng)).encode()
        digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
        headers = {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}
        return await http.post("/in/wa-sol", content=body, headers=headers)

    await _fuzz(post, name)


@pytest.mark.parametrize(
    ("folder", "path", "name"),
    [("zapi", f"/in/zapi-sol?token={ZAPI_TOKEN}", n) for n in _json_fixtures("zapi")]
    + [
        ("sendpulse", f"/in/sp-sol?token={SENDPULSE_TOKEN}", n) for n in _json_fixtures("sendpulse")
    ],
)
async def test_token_providers(http: httpx.AsyncClient, folder: str, path: str, name: str) -> None:
    """Z-API and SendPulse: a token in the URL, JSON bodies."""
    original = json.loads((FIXTURES / folder / name).read_bytes())

    async def post(rng: random.Random, case: str) -> httpx.Response:
        body = json.dumps(mutated(with_own_ids(original, case), rng)).encode()
        return await http.post(path, content=body, headers={"content-type": "application/json"})

    await _fuzz(post, f"{folder}/{name}")


@pytest.mark.parametrize("name", [p.name for p in _fixtures("twilio", ".form")])
async def test_twilio(http: httpx.AsyncClient, name: str) -> None:
    """Form fields are text: each mutation writes a nasty value's text into a field, or
    drops one, or repeats one."""
    original = parse_qsl((FIXTURES / "twilio" / name).read_text(), keep_blank_values=True)

    async def post(rng: random.Random, case: str) -> httpx.Response:
        own = [(k, f"{v}-{case}" if k in ID_KEYS else v) for k, v in original]
        return await _post_twilio(http, own, rng)

    await _fuzz(post, name)


async def _post_twilio(
    http: httpx.AsyncClient, fields: list[tuple[str, str]], rng: random.Random
) -> httpx.Response:
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(fields))
        action = rng.random()
        if action < 0.6:
            value = rng.choice(NASTY)
            text = value if isinstance(value, str) else json.dumps(value)
            fields[index] = (fields[index][0], text)
        elif action < 0.8 and len(fields) > 1:
            del fields[index]
        else:
            fields.append(fields[index])
    multi: dict[str, list[str]] = {}
    for key, value in fields:
        multi.setdefault(key, []).append(value)
    token = TWILIO_VECTOR["auth_token"].encode()
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-twilio-signature": twilio_signature(token, "http://hub/in/twilio-sol", multi),
    }
    return await http.post("/in/twilio-sol", content=urlencode(fields).encode(), headers=headers)


GENERIC_EVENT = {
    "type": "appointment.booked",
    "data": {
        "patient": {"name": "Maria Silva", "phone": "+5511987654321"},
        "slot": {"start": "2026-12-02T14:00:00-03:00", "minutes": 30},
        "status": "confirmed",
        "tags": ["first-visit"],
    },
}


async def test_generic_source(http: httpx.AsyncClient) -> None:
    """A business system's events, signed with Standard Webhooks (the routes' filters read
    `data.status`, so mutated data also goes through the filter language)."""

    async def post(rng: random.Random, case: str) -> httpx.Response:
        body = json.dumps(mutated(GENERIC_EVENT, rng)).encode()
        return await http.post("/in/crm-events", content=body, headers=signed(body, f"msg_{case}"))

    await _fuzz(post, "generic")
