"""The baseline's web side: a FastAPI endpoint that verifies the WhatsApp Cloud signature
(`X-Hub-Signature-256`, HMAC-SHA256 of the raw body with the app secret), parses the webhook
and enqueues one Celery task per message and destination.

    uvicorn app:app --app-dir bench/baseline --http httptools --loop uvloop

Configured by environment: `BENCH_APP_SECRET`, `BENCH_DESTINATIONS` (comma-separated URLs).
Like most such code it answers once the task is in Redis (not fsync'ed) and does not
deduplicate by message id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from tasks import deliver

APP_SECRET = os.environ.get("BENCH_APP_SECRET", "").encode()
DESTINATIONS = [u for u in os.environ.get("BENCH_DESTINATIONS", "").split(",") if u]

app = FastAPI()


@app.post("/webhooks/whatsapp")
async def whatsapp(
    request: Request, x_hub_signature_256: str | None = Header(default=None)
) -> dict[str, Any]:
    body = await request.body()
    expected = "sha256=" + hmac.new(APP_SECRET, body, hashlib.sha256).hexdigest()
    if not x_hub_signature_256 or not hmac.compare_digest(x_hub_signature_256, expected):
        raise HTTPException(status_code=401, detail="invalid signature")
    try:
        payload = json.loads(body)
    except ValueError:
        raise HTTPException(status_code=400, detail="invalid JSON") from None
    queued = 0
    for entry in payload.get("entry", []):
        for change in entry.get("changes", []):
            value = change.get("value", {})
            names = {
                c.get("wa_id"): c.get("profile", {}).get("name") for c in value.get("contacts", [])
            }
            for message in value.get("messages", []):
                event = {
                    "id": message["id"],
                    "type": "message.received",
                    "from": message.get("from"),
                    "contact_name": names.get(message.get("from")),
                    "timestamp": message.get("timestamp"),
                    "kind": message.get("type"),
                    "text": message.get("text", {}).get("body"),
                }
                for url in DESTINATIONS:
                    deliver.delay(url, event)
                    queued += 1
    return {"queued": queued}
