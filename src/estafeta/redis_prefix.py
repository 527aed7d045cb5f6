"""One Redis key prefix per deployment: another store's processes on it are refused.

Every key estafeta keeps in Redis starts with `[redis] key_prefix` (`estafeta:` unless set):
`<prefix>circuits` (delivery/circuit_store.py), `<prefix>throttle…` (delivery/throttle.py),
`<prefix>ingress:<tenant>:…` (ingress/ratelimit.py), `<prefix>probe` (redis_client.py's
check that Redis takes writes) and `<prefix>processes` (here). Two
deployments on one Redis database under one prefix (staging and production, or several
customers' hubs, whose operators name their destinations and tenants alike: `crm`) would
share circuits and budgets: one's failing `crm` would stop the other's deliveries, one's
sends and webhooks would spend the other's rate limits.

So every process that uses Redis records itself in `<prefix>processes` (a sorted set: process
id → when last recorded, by Redis's clock) right after it records its presence in the store
(delivery/presence.py), and looks at the other processes recorded there within `LIVE_S`: one
its own store has not seen lately belongs to another store. A process that finds one at start
refuses to start (`RedisKeyPrefixShared`); one that finds one while it runs (Redis was
unreachable when it started, or two deployments started at the same moment) logs
`redis_key_prefix_shared` as an error at each announcement that finds a new one.

Processes rather than an id kept in the store: a store restored from another deployment's
backup (a staging refreshed from production's) would carry that deployment's id, and a store
recreated empty would be refused for as long as Redis remembers the one it replaced, where
here the processes of a stopped deployment are forgotten `LIVE_S` after they stop. Its cost
is two Redis round trips and one indexed query per announcement (every 10 s).
"""

from __future__ import annotations

from collections.abc import Collection

import redis.asyncio

from estafeta.errors import RedisKeyPrefixShared

# A process recorded in Redis this recently is running (six of its announcements: presence.py's
# LIVE_WINDOW_S, so a late one is not taken for gone).
LIVE_S = 60.0
# Its row in its store is at most this old then (the store records it just before Redis does;
# each is timed by its own clock, so their clocks may disagree by any amount).
STORE_SEEN_S = 2 * LIVE_S


class PrefixProcesses:
    """The processes recorded under one key prefix, this one (`process_id`) among them."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, process_id: str) -> None:
        self._client = client
        self.prefix = prefix
        self.key = f"{prefix}processes"
        self.process_id = process_id

    async def others(self, *, record: bool) -> set[str]:
        """The other processes recorded within `LIVE_S`; with `record`, this one is recorded
        first. Raises Redis's errors."""
        seconds, micros = await self._client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        live_ms = round(LIVE_S * 1000)
        async with self._client.pipeline(transaction=False) as pipe:
            if record:
                pipe.zadd(self.key, {self.process_id: now_ms})
                # Gone with the last process: nothing is left behind in a shared Redis.
                pipe.pexpire(self.key, 2 * live_ms)
            pipe.zremrangebyscore(self.key, "-inf", f"({now_ms - live_ms}")
            pipe.zrange(self.key, 0, -1)
            replies = await pipe.execute()
        return {_text(member) for member in replies[-1]} - {self.process_id}


def refusal(prefix: str, foreign: Collection[str]) -> RedisKeyPrefixShared:
    """The error of a start refused: it names the setting to change."""
    names = ", ".join(sorted(foreign)[:3]) + (", …" if len(foreign) > 3 else "")
    return RedisKeyPrefixShared(
        f"the Redis key prefix {prefix!r} is in use by running processes of another estafeta"
        f" (another store): {names}. Give each deployment that shares this Redis its own"
        " `[redis] key_prefix` (or its own database number in `[redis] url`); if this store"
        f" replaces theirs, stop them first (they are forgotten {LIVE_S:g} s after)."
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
