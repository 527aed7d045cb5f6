"""A hub served on a real port with its in-process workers, and a client of its messages
API: for tests that follow a message from the API to a provider's fake and back
(test_send_loop.py, test_provider_webhook_answers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from estafeta.api.app import create_app
from estafeta.api.auth import hash_key
from estafeta.config import load_config_dict
from estafeta.hub import Hub
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.fakes.meta import FakeMeta
from tests.conftest import served

MARIA = "+5511987654321"
META_APP_SECRET = "fake-meta-app-secret"
META_TOKEN, META_PHONE_NUMBER_ID = "meta-token", "114950281736452"


def fake_meta() -> FakeMeta:
    """Meta's Cloud API for the account `wa_sol` sends from (start and stop it)."""
    return FakeMeta(
        access_token=META_TOKEN, phone_number_id=META_PHONE_NUMBER_ID, app_secret=META_APP_SECRET
    )


def wa_sol(api_base: str, *, send_max_attempts: int = 3) -> dict[str, Any]:
    """clinica-sol's WhatsApp Cloud source, receiving and sending through `api_base`."""
    return {
        "id": "wa-sol",
        "tenant": "clinica-sol",
        "kind": "whatsapp_cloud",
        "app_secret": META_APP_SECRET,
        "verify_token": "v",
        "access_token": META_TOKEN,
        "phone_number_id": META_PHONE_NUMBER_ID,
        "api_base": api_base,
        "send_max_attempts": send_max_attempts,
    }


@dataclass
class MessagesClient:
    """`POST /api/v1/messages` to Maria and its view, with the tenant's key."""

    base: str
    key: str
    http: aiohttp.ClientSession

    async def send(self, source: str = "wa-sol", **body: Any) -> dict[str, Any]:
        async with self.http.post(
            f"{self.base}/api/v1/messages",
            json={"source": source, "to": MARIA, **body},
            headers={"authorization": f"Bearer {self.key}"},
        ) as r:
            assert r.status == 202, await r.text()
            answer: dict[str, Any] = await r.json()
            return answer

    async def message(self, message_id: str) -> dict[str, Any]:
        async with self.http.get(
            f"{self.base}/api/v1/messages/{message_id}",
            headers={"authorization": f"Bearer {self.key}"},
        ) as r:
            found: dict[str, Any] = await r.json()
            return found

    async def until(self, message_id: str, state: str, timeout_s: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            view = await self.message(message_id)
            if view["state"] == state:
                return view
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def served_hub(
    store: SqlStore, data: dict[str, Any], key: str
) -> AsyncIterator[MessagesClient]:
    """The configuration `data` served by `estafeta serve`'s app on a free port, its workers
    running, with `key` a key of the tenant clinica-sol."""
    config = load_config_dict(data)
    await store.sync_config(config, 1)
    await store.create_api_key(
        tenant_id="clinica-sol", key_hash=hash_key(key), label="", actor="test", now_ms=1
    )
    app = create_app(Hub(config, store), run_workers=True)
    async with served(app) as port, aiohttp.ClientSession() as http:
        yield MessagesClient(f"http://127.0.0.1:{port}", key, http)
