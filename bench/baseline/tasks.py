"""The baseline's Celery side: one task per (event, destination) that POSTs the event to the
destination with `requests`, retried with exponential backoff by Celery itself.

    celery --workdir bench/baseline -A tasks worker -Q estafeta-bench-webhooks

Broker: Redis, a dedicated database number and a key prefix (`BENCH_REDIS_URL`,
`estafeta-bench:`), results ignored. This is the usual shape of such code, not a strawman:
a pooled `requests.Session` per worker process, `autoretry_for`, `retry_backoff`.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
PREFIX = os.environ.get("BENCH_REDIS_PREFIX", "estafeta-bench:")
QUEUE = "estafeta-bench-webhooks"

app = Celery("bench_baseline", broker=REDIS_URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)

_session = requests.Session()


@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    autoretry_for=(requests.RequestException,),
    retry_backoff=True,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def deliver(self: Any, url: str, event: dict[str, Any]) -> None:
    """POST one event to one destination; a connection error or a non-2xx answer retries."""
    response = _session.post(url, json=event, headers={"webhook-id": event["id"]}, timeout=10)
    response.raise_for_status()
