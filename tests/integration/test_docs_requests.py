"""The requests the docs show work as a reader sends them: every `curl` of README.md,
docs/http-api.md, docs/operations.md and the how-tos is sent to a hub configured from the
docs' own snippets, and gets the documented status and an answer of the documented shape (the
same keys, each value of the same JSON type); every response example of http-api.md has the
shape of the answer its route gives, and so do the request forms and answers its prose and
tables give. Ids, keys and times differ from the docs' (they are the reader's own); names and
shapes may not."""

from __future__ import annotations

import hashlib
import hmac
import re
import shlex
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest

from estafeta.api.app import create_app
from estafeta.api.auth import hash_key
from estafeta.config import load_config_dict
from estafeta.delivery.decision import Transition
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.hub import Hub
from estafeta.ids import new_id
from estafeta.ingress.providers.twilio import signature as twilio_signature
from estafeta.ingress.spool import Spool
from estafeta.server import announced
from estafeta.store import open_store
from estafeta.store.records import CompletedAttempt
from estafeta.supervise import Tasks
from tests.conftest import lease_any
from tests.unit.test_docs_examples import README, README_CONFIG, blocks

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
HTTP_API = ROOT / "docs" / "http-api.md"
HOW_TO = ROOT / "docs" / "how-to"
OPERATIONS = ROOT / "docs" / "operations.md"
DOCUMENTS = [README, HTTP_API, OPERATIONS, *sorted(HOW_TO.glob("*.md"))]

# What the reader has in their shell: a tenant key made with `estafeta keys create` and the
# admin key.
TENANT_KEY = "est_docs_examples_key_00000000000000000000"
ADMIN_KEY = "docs-admin-key"
SHELL = {"KEY": TENANT_KEY, "ESTAFETA_ADMIN_KEY": ADMIN_KEY}

# Requests not sent, each with its reason (the list is checked: a stale entry fails).
NOT_SENT = {
    # The second page of a conversation: `$NEXT` is the first page's cursor, which
    # test_docs_examples.py checks is one the API takes; the first page is sent.
    "http-api.md: GET /api/v1/conversations/5511987654321?limit=2&cursor=$NEXT",
}


def documented_config(database_url: str) -> dict[str, Any]:
    """The README's file, with dlq.toml's billing source, destination and route, and
    connect-whatsapp.md's WhatsApp Cloud source (its handshake token `verify-1`, as
    http-api.md's example has it) and Twilio one, secrets filled as the reader would."""
    env = {
        "CRM_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "CRM_SIGNING_SECRET": "whsec_9sQZGHNKBPLdpN1Cf2pWhMROd+Y32GhePFOfGlgrQy4=",
        "WA_APP_SECRET": "meta-app-secret",
        "WA_VERIFY_TOKEN": "verify-1",
        "WA_ACCESS_TOKEN": "meta-access-token",
        "TWILIO_AUTH_TOKEN": "twilio-auth-token",
        "TWILIO_ACCOUNT_SID": "AC8f3e2d1c0b9a87654321fedcba098765",
    }

    def read(text: str) -> dict[str, Any]:
        return tomllib.loads(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], "x"), text))

    data = read(README_CONFIG)
    dlq = read(blocks(HOW_TO / "replay-the-dlq.md", "toml")[0])
    whatsapp = read(blocks(HOW_TO / "connect-whatsapp.md", "toml")[0])
    data["sources"] += dlq["sources"] + [
        s for s in whatsapp["sources"] if s["id"] in {"wa-sol", "tw-sol"}
    ]
    data["destinations"] += dlq["destinations"]
    data["routes"] += dlq["routes"]
    data["storage"] = {"url": database_url}
    data["security"] = {"admin_key": ADMIN_KEY}
    return data


@dataclass
class Request:
    where: str  # document and the request's method and path, the test's id
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    answer: str  # what the doc shows after it ("" for nothing)


def requests(document: Path) -> list[Request]:
    """Every `curl` of the document's console blocks, with the lines shown after it."""
    found = []
    for block in blocks(document, "console"):
        commands = re.split(r"^\$ ", block.replace("\\\n", " "), flags=re.M)
        for command in commands:
            line, _, answer = command.partition("\n")
            if not line.startswith("curl "):
                continue
            words = shlex.split(re.split(r" \| ", line)[0])  # `| python3 -m json.tool`
            method, headers, body, url = "GET", {}, None, ""
            i = 1
            while i < len(words):
                word = words[i]
                if word == "-X":
                    method, i = words[i + 1], i + 1
                elif word == "-H":
                    name, _, value = words[i + 1].partition(":")
                    headers[name.strip().lower()] = value.strip()
                    i += 1
                elif word == "-d":
                    body, method, i = words[i + 1].encode(), "POST", i + 1
                elif not word.startswith("-"):
                    url = word
                elif word != "-s":  # an option this reader does not know: teach it
                    raise ValueError(f"{document.name}: curl option {word} in {line!r}")
                i += 1
            split = urlsplit(url if "://" in url else f"http://{url}")
            path = split.path + (f"?{split.query}" if split.query else "")
            found.append(
                Request(
                    f"{document.name}: {method} {path}",
                    method,
                    path,
                    headers,
                    body,
                    answer.strip(),
                )
            )
    return found


REQUESTS = [request for document in DOCUMENTS for request in requests(document)]


def shape(value: Any) -> Any:
    """`value`'s shape: an object's keys and their shapes, a list's first item's, else the
    JSON type (`null` goes with any type, as an example shows one case of a nullable field)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return None if value is None else type(value).__name__


# Objects whose keys are ids (destinations), not field names.
MAPS = {".checks.circuits"}


def differences(documented: Any, actual: Any, where: str = "") -> list[str]:
    """How `actual`'s shape departs from the documented one. A documented key `"…"` means
    "more fields here" (only the keys shown are checked); an empty documented list or a
    documented `null` checks nothing inside."""
    if where in MAPS and isinstance(documented, dict) and isinstance(actual, dict):
        # Keyed by ids (the reader's configuration's): each entry has the documented shape.
        example = next(iter(documented.values()))
        return [f for key in actual for f in differences(example, actual[key], f"{where}[{key}]")]
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return [f"{where or '.'}: an object in the docs, {actual!r} here"]
        found = []
        shown = {key for key in documented if key != "…"}
        if "…" not in documented and set(actual) - shown:
            found.append(f"{where or '.'}: undocumented {sorted(set(actual) - shown)}")
        for key in sorted(shown):
            if key not in actual:
                found.append(f"{where}.{key}: documented, not answered")
            else:
                found += differences(documented[key], actual[key], f"{where}.{key}")
        return found
    if isinstance(documented, list):
        if not isinstance(actual, list):
            return [f"{where}: a list in the docs, {actual!r} here"]
        if documented and actual:
            return differences(documented[0], actual[0], f"{where}[0]")
        return []
    if documented is None or actual is None or shape(documented) == shape(actual):
        return []
    return [f"{where}: {documented!r} in the docs, {actual!r} here"]


@dataclass
class Scene:
    """A hub as a reader's would be after following the docs: an event published, a
    message sent, three billing webhooks dead-lettered."""

    http: httpx.AsyncClient
    hub: Hub
    event_id: str
    message_id: str
    dead: list[str]
    dead_event_id: str  # the event of `dead[0]`, which has attempts to show

    def fill(self, text: str) -> str:
        """The doc's ids and shell variables replaced by the reader's."""
        text = re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL.get(m[1], m[0]), text)
        text = re.sub(r"\bevt_\w{26}\b", self.event_id, text)
        text = re.sub(r"\bmsg_\w{26}\b", self.message_id, text)
        return re.sub(r"\bdlv_\w{26}\b", self.dead[0], text)

    async def send(self, request: Request) -> httpx.Response:
        headers = {name: self.fill(value) for name, value in request.headers.items()}
        return await self.http.request(
            request.method, self.fill(request.url), headers=headers, content=request.body
        )


@pytest.fixture
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    config = load_config_dict(documented_config(f"sqlite:///{tmp_path / 'docs.db'}"))
    store = open_store(config.storage.url)
    await store.migrate()
    await store.sync_config(config, 1_700_000_000_000)
    await store.create_api_key(
        tenant_id="clinica-sol", key_hash=hash_key(TENANT_KEY), label="", actor="t", now_ms=1
    )
    # A spool, the process's presence and the app's lifespan (its alert monitor), as
    # `estafeta serve --no-workers` has them.
    hub = Hub(config, store, spool=Spool(tmp_path / "spool", max_bytes=1 << 30))
    tasks = Tasks()
    presence = await announced(store, config, delivers=False, tasks=tasks, clock=hub.clock)
    app = create_app(hub, presence=presence, tasks=tasks)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.api.router.lifespan_context(app.api),
        httpx.AsyncClient(transport=transport, base_url="http://localhost:8080") as http,
    ):
        tenant = {"authorization": f"Bearer {TENANT_KEY}"}
        event = await http.post(
            "/api/v1/events",
            headers=tenant,
            json={"type": "message.received", "data": {"kind": "text"}, "idempotency_key": "e"},
        )
        message = await http.post(
            "/api/v1/messages",
            headers=tenant,
            json={"source": "wa-sol", "to": "+5511987654321", "text": "Olá", "priority": 0},
        )
        for n in range(3):
            await http.post(
                "/in/billing-system",
                headers={"authorization": "Bearer source-key-1", "idempotency-key": f"b{n}"},
                json={"invoice": f"inv-{n}"},
            )
        # The receiver answered 503 to every billing attempt: they are dead.
        now = hub.clock.now_ms()
        leased = await lease_any(store, now_ms=now)
        billing = [d for d in leased if d.destination_id == "billing"]
        await store.release([d for d in leased if d.destination_id != "billing"], now)
        outcome = Outcome(OutcomeKind.RETRYABLE, 5.0, status_code=503)
        dead = Transition(DeliveryState.DEAD, 2, None, "http_503: Service Unavailable")
        await store.complete(
            [CompletedAttempt(d, outcome, dead, 2, new_id("att")) for d in billing], now
        )
        assert len(billing) == 3
        yield Scene(
            http,
            hub,
            event.json()["id"],
            message.json()["id"],
            [d.id for d in billing],
            billing[0].event_id,
        )
    await presence.retire()
    await hub.close()
    await store.close()


def documented_status(request: Request) -> int:
    """The status http-api.md gives the answer shown: an error's from the error table, else
    `202` for what stores (ingest, publish, send, escalate), `200` for the rest."""
    if request.answer.startswith('{"error"'):
        code = orjson.loads(request.answer.splitlines()[0])["error"]
        table = HTTP_API.read_text(encoding="utf-8")
        return int(re.search(rf"^\| (\d{{3}}) \| `{code}` \|", table, re.M)[1])  # type: ignore[index]
    stores = re.match(
        r"/(in/|api/v1/(events|messages)$|api/v1/conversations/.+/escalate)", request.url
    )
    return 202 if request.method == "POST" and stores else 200


def test_every_page_with_requests_has_some() -> None:
    by_document = {request.where.split(":")[0] for request in REQUESTS}
    pages = {
        "README.md",
        "http-api.md",
        "operations.md",
        "connect-whatsapp.md",
        "replay-the-dlq.md",
    }
    assert pages <= by_document
    assert {request.where for request in REQUESTS} >= NOT_SENT


@pytest.mark.parametrize(
    "request_", [r for r in REQUESTS if r.where not in NOT_SENT], ids=lambda r: r.where
)
async def test_each_documented_request_gets_the_documented_answer(
    scene: Scene, request_: Request
) -> None:
    r = await scene.send(request_)
    assert r.status_code == documented_status(request_), r.text
    answers = [line for line in request_.answer.splitlines() if not line.startswith("$")]
    shown = "\n".join(answers)
    if not shown:
        return
    if not shown.startswith("{"):
        assert r.text == shown
        return
    try:
        documented = orjson.loads(shown)
    except orjson.JSONDecodeError:
        # An abridged answer (`… ,`): the keys it shows are answered.
        keys = set(re.findall(r'"(\w+)":', shown))
        answered = orjson.dumps(r.json()).decode()
        assert {key for key in keys if f'"{key}":' not in answered} == set()
        return
    assert differences(documented, r.json()) == []


# http-api.md's response examples (```json blocks), in order, each with the request whose
# answer it shows.
RESPONSES = blocks(HTTP_API, "json")
ANSWERED_BY = [
    ("GET", "/api/v1/nothing", None),  # the error body: any error's
    ("GET", "/api/v1/events/{dead_event}", ADMIN_KEY),
    ("GET", "/api/v1/dlq", ADMIN_KEY),
    ("GET", "/api/v1/messages/{message}", TENANT_KEY),
    ("GET", "/api/v1/conversations", TENANT_KEY),
    ("GET", "/health/detailed", ADMIN_KEY),
]


def test_each_response_example_has_its_route() -> None:
    assert len(RESPONSES) == len(ANSWERED_BY)


@pytest.mark.parametrize(
    ("example", "request_"),
    list(zip(RESPONSES, ANSWERED_BY, strict=True)),
    ids=[path for _, path, _ in ANSWERED_BY],
)
async def test_each_response_example_has_the_answers_shape(
    scene: Scene, example: str, request_: tuple[str, str, str | None]
) -> None:
    method, path, key = request_
    url = path.format(dead_event=scene.dead_event_id, message=scene.message_id)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = await scene.http.request(method, url, headers=headers)
    assert differences(orjson.loads(example), r.json()) == []


# Requests and answers http-api.md gives in its prose and tables rather than in a block: each
# with the words of the doc that document it (checked to be there, so an edit of the doc
# shows here), the body a reader would write from them, the documented status and the
# documented answer's shape.
@dataclass
class Form:
    words: str  # as http-api.md has them
    method: str
    path: str
    key: str | None
    body: Any
    status: int
    answer: Any


TEMPLATE = {"name": "consulta_confirmada", "language": "pt_BR"}
TEMPLATE_COMPONENTS = {
    **TEMPLATE,
    "components": [{"type": "body", "parameters": [{"type": "text", "text": "Maria"}]}],
}
QUEUED = {"id": "msg_…", "event_id": "evt_…", "state": "queued", "duplicate": False}
FORMS = [
    Form(
        "`text` | string, 1–4096",
        "POST",
        "/api/v1/messages",
        TENANT_KEY,
        {"source": "wa-sol", "to": "+55 (11) 98765-4321", "text": "Olá"},
        202,
        QUEUED,
    ),
    Form(
        "`{name, language, components?}`",
        "POST",
        "/api/v1/messages",
        TENANT_KEY,
        {"source": "wa-sol", "to": "+5511987654321", "template": TEMPLATE_COMPONENTS},
        202,
        QUEUED,
    ),
    Form(
        "on Twilio `{content_sid, variables?}`",
        "POST",
        "/api/v1/messages",
        TENANT_KEY,
        {
            "source": "tw-sol",
            "to": "+5511987654321",
            "template": {
                "content_sid": "HXb5b62575e6e4ff6129ad7c8efe1f983e",
                "variables": {"1": "Maria"},
            },
        },
        202,
        QUEUED,
    ),
    Form(
        "its SID (`HX…`, at most 64 characters) as `content_sid` (or as `name`)",
        "POST",
        "/api/v1/messages",
        TENANT_KEY,
        {
            "source": "tw-sol",
            "to": "+5511987654321",
            "template": {"name": "HXb5b62575e6e4ff6129ad7c8efe1f983e", "language": "pt_BR"},
        },
        202,
        QUEUED,
    ),
    Form(
        "a `content_sid` through another provider `400 unsupported_message`",
        "POST",
        "/api/v1/messages",
        TENANT_KEY,
        {
            "source": "wa-sol",
            "to": "+5511987654321",
            "template": {"content_sid": "HXb5b62575e6e4ff6129ad7c8efe1f983e"},
        },
        400,
        {"error": "unsupported_message", "detail": "…"},
    ),
    Form(
        "`{kind, url, caption?, filename?}`",
        "POST",
        "/api/v1/messages",
        TENANT_KEY,
        {
            "source": "wa-sol",
            "to": "+5511987654321",
            "media": {
                "kind": "document",
                "url": "https://files.example.com/guia.pdf",
                "caption": "Guia",
                "filename": "guia.pdf",
            },
        },
        202,
        QUEUED,
    ),
    Form(
        '`{"type": "appointment.booked", "data": {…}}`',
        "POST",
        "/api/v1/events",
        TENANT_KEY,
        {
            "type": "appointment.booked",
            "data": {"id": "apt-1"},
            "priority": 0,
            "ordering_key": "apt-1",
        },
        202,
        {"id": "evt_…", "duplicate": False},
    ),
    Form(
        '`{"id": "5511987654321", "status": "closed"}`',
        "POST",
        "/api/v1/conversations/5511987654321/close",
        TENANT_KEY,
        None,
        200,
        {"id": "5511987654321", "status": "closed"},
    ),
    Form(
        '`{"discarded": [...], "count": n, "more": false}`',
        "POST",
        "/api/v1/dlq/discard",
        ADMIN_KEY,
        {"destination": "billing", "limit": 1},
        200,
        {"discarded": ["dlv_…"], "count": 1, "more": True},
    ),
    Form(
        '`200 {"status": "ok", "version": "0.1.0"}`',
        "GET",
        "/health",
        None,
        None,
        200,
        {"status": "ok", "version": "0.1.0"},
    ),
]


def test_each_form_is_in_the_reference() -> None:
    text = re.sub(r"\s+", " ", HTTP_API.read_text(encoding="utf-8"))
    assert [form.words for form in FORMS if form.words not in text] == []


@pytest.mark.parametrize("form", FORMS, ids=[f"{f.method} {f.path}: {f.words}" for f in FORMS])
async def test_each_documented_form_gets_its_answer(scene: Scene, form: Form) -> None:
    headers = {"authorization": f"Bearer {form.key}"} if form.key else {}
    r = await scene.http.request(form.method, form.path, headers=headers, json=form.body)
    assert r.status_code == form.status, r.text
    assert differences(form.answer, r.json()) == []


async def test_a_signed_provider_webhook_gets_the_documented_answer(scene: Scene) -> None:
    # Signed as Meta signs it: HMAC-SHA256 of the body with the app's secret.
    body = (ROOT / "tests" / "fixtures" / "whatsapp_cloud" / "text.json").read_bytes()
    digest = hmac.new(b"meta-app-secret", body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}
    r = await scene.http.post("/in/wa-sol", content=body, headers=headers)
    assert (r.status_code, differences({"id": "evt_…", "duplicate": False}, r.json())) == (200, [])


async def test_the_event_a_receiver_gets_has_the_documented_shape(scene: Scene) -> None:
    # add-a-destination.md shows the body each delivery POSTs: the canonical event, which
    # `GET /api/v1/events/{id}` gives as `event`.
    [example] = blocks(HOW_TO / "add-a-destination.md", "json")
    answer = await scene.http.get(
        f"/api/v1/events/{scene.event_id}", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    documented = orjson.loads(example) | {"data": {"…": "the event's own"}}
    assert differences(documented, answer.json()["event"]) == []


async def test_a_signed_twilio_webhook_gets_the_documented_twiml(scene: Scene) -> None:
    # Signed as Twilio signs it: over the address it calls (the source's `public_url`, from
    # connect-whatsapp.md) and the form's fields.
    body = (ROOT / "tests" / "fixtures" / "twilio" / "inbound_text.form").read_bytes().strip()
    fields = parse_qs(body.decode(), keep_blank_values=True)
    signed = twilio_signature(b"twilio-auth-token", "https://hooks.example.com/in/tw-sol", fields)
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-twilio-signature": signed,
    }
    r = await scene.http.post("/in/tw-sol", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/xml")
    assert r.text == '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
    assert r.headers["x-estafeta-event-id"].startswith("evt_")
