"""`estafeta demo`: the whole pipeline on SQLite, in one process, in about ten seconds.

A clinic's hub receives WhatsApp-shaped webhooks through a signed generic source and
appointment events from its own systems through the API; it delivers them to a healthy CRM
sink and to a billing sink that is down at first. Billing deliveries retry, run out of
attempts and land in the dead-letter queue; billing comes back, the operator replays the
queue, and everything is delivered. The hub, the sinks and the database are real.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from estafeta.api.app import create_app
from estafeta.api.auth import hash_key, new_api_key
from estafeta.clock import SystemClock
from estafeta.config import ENV_OVERRIDES, Config, load_config
from estafeta.config.models import split_listen
from estafeta.errors import ServeError
from estafeta.hub import Hub
from estafeta.server import prepared_store, uvicorn_server
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.fakes.meta import FakeMeta
from estafeta.testing.sink import Sink


def _this_command() -> str:
    """How the reader runs this estafeta, for the commands the demo prints.

    `make demo` runs `.venv/bin/estafeta` without the virtualenv on PATH, where a bare
    `estafeta` is not found (or is another installation's): name the script itself unless
    PATH already leads to it.
    """
    script = Path(sys.executable).parent / "estafeta"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m estafeta"
    on_path = shutil.which("estafeta")
    if on_path is not None and Path(on_path).resolve() == script.resolve():
        return "estafeta"
    inside = os.path.relpath(script, Path.cwd())
    return shlex.quote(script.as_posix() if inside.startswith("..") else inside)


def _ignored() -> list[str]:
    """The `ESTAFETA_*` overrides set in this shell that the demo does not take: a shell set
    up for production must not get the demo's tenant, key and events written into its
    database, its Redis or its admin key."""
    return sorted(v for v in ENV_OVERRIDES if v != "ESTAFETA_LISTEN" and v in os.environ)


def _new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


# Fresh for every run: the demo writes them into its own config file only.
SOURCE_SECRET = _new_secret()
APP_SECRET = secrets.token_hex(16)
VERIFY_TOKEN = "demo-verify-" + secrets.token_hex(4)
ACCESS_TOKEN = "demo-access-" + secrets.token_hex(8)
PHONE_NUMBER_ID = "114950281736452"
BUSINESS_NUMBER = "551140028922"
SINK_SECRET = _new_secret()
ADMIN_KEY = "demo-" + secrets.token_urlsafe(12)
CUSTOMERS = [("5511987654321", "Maria Silva"), ("5511912345678", "João Pereira")]


def _private(path: str, flags: int) -> int:
    """`open`'s opener for a file only its owner may read."""
    return os.open(path, flags, 0o600)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def chosen_listen(listen: str | None) -> str:
    """Where the demo's hub listens: `listen` (`--listen`), a free port on its host when its
    port is 0, or a free port on 127.0.0.1."""
    if listen is None:
        return f"127.0.0.1:{free_port()}"
    host, port = split_listen(listen)
    bracketed = f"[{host}]" if ":" in host else host
    return f"{bracketed}:{port or free_port(host)}"


def base_url(listen: str) -> str:
    """How the demo reaches its own hub listening on `listen` (any address: loopback)."""
    host, port = split_listen(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - a client's view
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _toml_string(text: str) -> str:
    """`text` as a TOML basic string: JSON's escapes are TOML's, but for DEL, which TOML
    does not take as it is."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def demo_config_toml(db: Path, listen: str, crm_url: str, billing_url: str, meta_url: str) -> str:
    # The directory's name is the reader's (--dir, TMPDIR): quoted for the URL (else a '?'
    # or '#' in it ends the database's path) and for TOML (a '"' or '\\').
    url = "sqlite:///" + urllib.parse.quote(db.as_posix())
    # The spool beside the database: by default it is ./estafeta-spool, in whichever
    # directory the printed `serve` is run from, an installation's own spool perhaps.
    spool = db.parent / "estafeta-spool"
    return f"""\
# Written by `estafeta demo`; use it with the commands it prints.
[server]
listen = "{listen}"

[storage]
url = {_toml_string(url)}
spool_dir = {_toml_string(spool.as_posix())}

[security]
admin_key = "{ADMIN_KEY}"

[worker]
poll_interval_s = 0.05

[[tenants]]
id = "clinica-sol"
name = "Clínica Sol"
ingress_rate_limit = "10000/minute"

[[sources]]
id = "wa-sol"                       # the clinic's WhatsApp number: webhooks at /in/wa-sol
tenant = "clinica-sol"
kind = "whatsapp_cloud"
app_secret = "{APP_SECRET}"
verify_token = "{VERIFY_TOKEN}"
access_token = "{ACCESS_TOKEN}"
phone_number_id = "{PHONE_NUMBER_ID}"
api_base = "{meta_url}"             # a fake WhatsApp Cloud API on this machine

[[sources]]
id = "crm-events"                   # the clinic's own systems, signed (Standard Webhooks)
tenant = "clinica-sol"
kind = "generic"
secret = "{SOURCE_SECRET}"

[[destinations]]
id = "crm"
tenant = "clinica-sol"
url = "{crm_url}/hooks/crm"
secret = "{SINK_SECRET}"
timeout_s = 5

[[destinations]]
id = "billing"
tenant = "clinica-sol"
url = "{billing_url}/hooks/billing"
secret = "{SINK_SECRET}"
timeout_s = 5
max_attempts = 3
backoff = {{ base_s = 0.2, factor = 2, max_s = 2, jitter = 0.2 }}
circuit = {{ failures = 50, reset_s = 1 }}   # the demo shows the dead-letter queue, not the breaker

[[routes]]
id = "messages-to-crm"
tenant = "clinica-sol"
events = ["message.*"]
destinations = ["crm"]
priority = 1

[[routes]]
id = "appointments"
tenant = "clinica-sol"
events = ["appointment.*"]
destinations = ["crm", "billing"]
priority = 2
"""


def cloud_webhook(n: int) -> bytes:
    """A WhatsApp Cloud API webhook carrying one text message, as Meta sends it (contracts
    §1.4), with a distinct WAMID."""
    number, name = CUSTOMERS[n % len(CUSTOMERS)]
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "108372914455201",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": BUSINESS_NUMBER,
                                "phone_number_id": PHONE_NUMBER_ID,
                            },
                            "contacts": [{"profile": {"name": name}, "wa_id": number}],
                            "messages": [
                                {
                                    "from": number,
                                    "id": f"wamid.DEMO{n:06d}",
                                    "timestamp": str(int(time.time())),
                                    "type": "text",
                                    "text": {"body": "Olá! Gostaria de agendar uma consulta."},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    return orjson.dumps(body)


def meta_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()


async def _settled(store: SqlStore, timeout_s: float) -> dict[str, int]:
    """Wait until no delivery is pending or in flight (a demo may poll; tests use sinks)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = (await store.queue_stats(history=True)).by_state
        busy = stats.get("pending", 0) + stats.get("in_flight", 0)
        if busy == 0 or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


async def _wait_state(
    http: aiohttp.ClientSession, url: str, auth: dict[str, str], state: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        async with http.get(url, headers=auth) as r:
            view: dict[str, Any] = await r.json()
        if view.get("state") == state or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.05)


async def _story(workdir: Path, event_count: int, listen: str | None) -> int:
    crm, billing = Sink(secret=SINK_SECRET), Sink(secret=SINK_SECRET)
    meta = FakeMeta(
        access_token=ACCESS_TOKEN, phone_number_id=PHONE_NUMBER_ID, app_secret=APP_SECRET
    )
    started: list[Sink | FakeMeta] = []
    store: SqlStore | None = None
    try:
        for server_ in (crm, billing, meta):
            await server_.start()
            started.append(server_)
        billing.respond(503)  # billing is down when the story starts
        where = chosen_listen(listen)  # once: port 0 picks a different port each time
        config_file = workdir / "estafeta.toml"

        def write_config() -> None:
            db = workdir / "estafeta.db"
            toml = demo_config_toml(db, where, crm.url, billing.url, meta.url)
            # Its owner's only, whatever the umask: it holds the admin key `serve --config`
            # takes.
            with open(config_file, "w", encoding="utf-8", opener=_private) as file:
                file.write(toml)

        write_config()
        # ESTAFETA_LISTEN applies, as to `serve`; the other overrides do not (_ignored()).
        ignored = set(_ignored())
        environment = {k: v for k, v in os.environ.items() if k not in ignored}
        config: Config = load_config(config_file, environment)
        # --listen over it, as for `serve`; a port of 0 from ESTAFETA_LISTEN picks a free
        # one too, once, or the demo would talk to port 0 while its hub listens elsewhere.
        if listen is None and config.server.listen != where:
            where = chosen_listen(config.server.listen)
            write_config()  # the printed `serve` listens where the printed curls go
        server_settings = config.server.model_copy(update={"listen": where})
        config = config.model_copy(update={"server": server_settings})
        store = await prepared_store(config)
        return await _served_story(
            workdir, event_count, config, config_file, store, meta, crm, billing
        )
    finally:
        if store is not None:
            await store.close()
        for server_ in started:
            await server_.stop()


async def _served_story(
    workdir: Path,
    event_count: int,
    config: Config,
    config_file: Path,
    store: SqlStore,
    meta: FakeMeta,
    crm: Sink,
    billing: Sink,
) -> int:
    api_key = new_api_key()
    await store.create_api_key(
        tenant_id="clinica-sol",
        key_hash=hash_key(api_key),
        label="demo",
        actor="demo",
        now_ms=SystemClock().now_ms(),
    )
    server = uvicorn_server(create_app(Hub(config, store), run_workers=True), config.server.listen)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():  # it could not start (the address in use): ServeError, said once
            await serving
            raise ServeError(f"cannot serve on {config.server.listen}")
        await asyncio.sleep(0.02)
    base = base_url(config.server.listen)
    webhook = f"{base}/in/wa-sol"
    # Ctrl-C or SIGTERM stops the hub (uvicorn takes the signals): the story stops with it,
    # where it went on talking to a hub that was gone, ending in aiohttp's traceback.
    story = asyncio.current_task()
    assert story is not None  # noqa: S101 - a coroutine runs in a task

    def stop_story(_: asyncio.Task[None]) -> None:
        story.cancel()

    serving.add_done_callback(stop_story)
    # As the commands write (cli/common.py): a reader gone (`estafeta demo | head -1`) ends
    # the demo quietly, a full stdout with one line saying so. print() let the first
    # out as a cascade of tracebacks, through the hub's stop.
    from estafeta.cli.common import out as say

    try:  # the hub stopped whatever ends the story, a stdout that fails too
        say(f"estafeta demo — hub on {base}, SQLite at {workdir / 'estafeta.db'}\n")
        if ignored := _ignored():
            say(
                f"(the demo ignores {', '.join(ignored)}, set in this shell; unset them before "
                "the commands printed at the end, which would use them)\n"
            )
        async with aiohttp.ClientSession() as http:
            auth = {"authorization": f"Bearer {api_key}"}
            challenge = secrets.token_hex(5)
            query = f"hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge={challenge}"
            async with http.get(f"{webhook}?{query}") as r:
                echoed = (await r.text()) == challenge
            outcome = "echoed" if echoed else "NOT echoed"
            say(f"whatsapp   Meta's subscription handshake: challenge {outcome}")

            accepted = duplicates = 0
            for n in range(event_count):
                body = cloud_webhook(n)
                headers = {
                    "content-type": "application/json",
                    "x-hub-signature-256": meta_signature(body),
                }
                for _ in range(2 if n == 0 else 1):  # Meta redelivers the first one
                    async with http.post(webhook, data=body, headers=headers) as r:
                        answer = await r.json()
                        # Meta's answer is 200 (it retries anything else): new or repeated.
                        duplicate = answer.get("duplicate", False)
                        accepted += r.status == 200 and not duplicate
                        duplicates += r.status == 200 and duplicate
            say(
                f"received   {accepted} WhatsApp messages from {len(CUSTOMERS)} customers "
                f"(signed by Meta); {duplicates} redelivered webhook answered as a duplicate"
            )

            reply = {
                "source": "wa-sol",
                "to": f"+{CUSTOMERS[0][0]}",
                "text": "Olá Maria! Temos horário amanhã às 9h.",
            }
            async with http.post(f"{base}/api/v1/messages", json=reply, headers=auth) as r:
                message_id = (await r.json())["id"]
            message_url = f"{base}/api/v1/messages/{message_id}"
            sent = await _wait_state(http, message_url, auth, "sent")
            wamid = sent.get("provider_message_id") or ""
            await meta.send_status(webhook, wamid, "delivered")
            await meta.send_status(webhook, wamid, "read")
            read = await _wait_state(http, message_url, auth, "read")
            steps = " → ".join(step["state"] for step in read["timeline"])
            say(f"replied    to Maria through the WhatsApp Cloud API (a local fake): {steps}")

            booked = max(1, event_count // 4)
            appointments: list[str] = []  # their ids
            for n in range(booked):
                event = {
                    "type": "appointment.booked",
                    "data": {"appointment_id": f"apt-{n}", "when": "2026-12-01T09:00:00-03:00"},
                    "idempotency_key": f"apt-{n}",
                }
                async with http.post(f"{base}/api/v1/events", json=event, headers=auth) as r:
                    accepted += r.status == 202
                    appointments.append((await r.json()).get("id", ""))
            say(f"received   {booked} appointments from the clinic's systems through the API")

            stats = await _settled(store, 30)
            failures = sum(1 for r in billing.received if r.webhook_id not in billing.delivered_ids)
            say(
                f"delivered  {len(crm.delivered_ids)} events to crm; billing was down: "
                f"{failures} attempts failed and were retried with backoff"
            )
            say(
                f"dead       {stats.get('dead', 0)} deliveries to billing ran out of attempts "
                "and wait in the dead-letter queue"
            )

            billing.respond(200)  # billing is back
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            async with http.post(
                f"{base}/api/v1/dlq/replay", json={"destination": "billing"}, headers=admin
            ) as r:
                replayed = (await r.json())["count"]
            stats = await _settled(store, 30)
            say(f"replayed   {replayed} from the dead-letter queue once billing was back")
            async with http.get(f"{base}/api/v1/conversations", headers=auth) as r:
                conversations = (await r.json())["conversations"]
            say(
                "conversations  "
                + "; ".join(
                    f"{c['contact_name']}: {c['inbound_count']} in, {c['outbound_count']} out"
                    for c in conversations
                )
            )
            say(
                f"all done   {stats.get('succeeded', 0)} deliveries succeeded, "
                f"{stats.get('dead', 0)} dead, {stats.get('pending', 0)} pending; every "
                f"delivery signed ({len(crm.bad_signatures) + len(billing.bad_signatures)} "
                "bad signatures)"
            )
            ok = (
                echoed
                and duplicates == 1
                and read.get("state") == "read"
                and stats.get("dead", 0) == 0
                and stats.get("pending", 0) == 0
                and len(billing.delivered_ids) == booked
            )
            say("\nLook further (the hub is stopped now; these read the demo's database):")
            estafeta = _this_command()
            config_arg = shlex.quote(str(config_file))
            say(f"  {estafeta} dlq list --config {config_arg}")
            say(
                f"  {estafeta} serve --config {config_arg}     # then, with the admin key "
                f"'{ADMIN_KEY}':"
            )
            # An appointment: its deliveries, billing's failed attempts, then the replay.
            say(
                f"  curl -H 'authorization: Bearer {ADMIN_KEY}' "
                f"{base}/api/v1/events/{appointments[0]}"
            )
            say(
                f"  curl -H 'authorization: Bearer {ADMIN_KEY}' "
                f"'{base}/api/v1/conversations?tenant=clinica-sol'"
            )
            say(f"  curl -H 'authorization: Bearer {ADMIN_KEY}' {message_url}")
            say(f"  curl -H 'authorization: Bearer {ADMIN_KEY}' {base}/health/detailed")
            return 0 if ok else 1
    except (asyncio.CancelledError, aiohttp.ClientError):
        # The hub closes its connections as soon as the signal comes, and ends later.
        if not server.should_exit or story.cancelling() > 1:
            raise  # not the hub's stop: someone else's cancellation, or a real failure
        if story.cancelling():
            story.uncancel()
        print(f"\ndemo interrupted: the hub stopped; its database is kept at {workdir}")
        return 1
    finally:
        serving.remove_done_callback(stop_story)  # the story's own stop of the hub, next
        server.should_exit = True
        await serving


def run_demo(
    *, workdir: str | None = None, event_count: int = 20, listen: str | None = None
) -> int:
    """Run the story; returns the process exit code (0 when everything was delivered).
    Raises ServeError when the hub cannot listen on `listen` (HOST:PORT; default a free port
    on 127.0.0.1)."""
    from estafeta.server import run

    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="estafeta-demo-"))
    # Its owner's only when made here (as mkdtemp's): it holds the config with the admin key
    # and the database with the customers' names, numbers and messages.
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    result: list[int] = []

    async def main() -> None:
        result.append(await _story(base.resolve(), event_count, listen))

    try:
        run(main)
    except ServeError:
        # The hub never listened, so the story never began: take back what it wrote, or the
        # same --dir is refused next time (it "already holds" them) and a temporary
        # directory the reader was never told of stays behind.
        _take_back(base, made_here=workdir is None)
        raise
    return result[0]


def _take_back(base: Path, *, made_here: bool) -> None:
    """Remove what the demo wrote in `base` (all of it when the demo made `base`): only its
    own files, since a `--dir` may hold others."""
    if made_here:
        shutil.rmtree(base, ignore_errors=True)
        return
    for name in ("estafeta.toml", "estafeta.db", "estafeta.db-wal", "estafeta.db-shm"):
        (base / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the spool it names, if made and still empty
        (base / "estafeta-spool").rmdir()
