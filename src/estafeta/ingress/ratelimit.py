"""Inbound rate limit per tenant (the `limits` package's sliding window counter).

The sliding window counter keeps two counters per tenant and weighs the previous window by
how much of it still overlaps: O(1) per request. The moving window keeps one entry per
request in the window (a tenant allowed 6,000/minute holds 6,000 entries, inserted at the
front of a list on every hit), which measured as the largest cost on the ingest path.

Counted in each process's memory, even when Redis is configured (documented in
docs/configuration.md): a shared window would cost a Redis round trip on every webhook.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from estafeta.config import Config


class TenantRateLimiter:
    def __init__(self, config: Config) -> None:
        self._storage = MemoryStorage()
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._limits: dict[str, RateLimitItem] = {
            t.id: parse(t.ingress_rate_limit) for t in config.tenants
        }

    async def retry_after(self, tenant_id: str, cost: int = 1) -> float | None:
        """None when the request may pass (and is counted); else seconds to wait."""
        item = self._limits.get(tenant_id)
        if item is None:
            return None
        if await self._limiter.hit(item, tenant_id, cost=cost):
            return None
        stats = await self._limiter.get_window_stats(item, tenant_id)
        return max(1.0, math.ceil(stats.reset_time - time.time()))
