-- The stored event of each (tenant, source, idempotency key) given: the originals the batch
-- statement (store_batch_postgresql.sql) could not name, committed by another process while
-- it ran, and the spool's check of keys that wait behind theirs (hub.py).
--
-- The keys come as three arrays, one statement for any number of them. Each key is looked up
-- by the key's unique index (events_idempotency_key), LIMIT 1 keeping it a probe per key,
-- even on statistics taken while the table was small: a `(tenant_id, source_id,
-- idempotency_key) IN (…)` list of 1,000 keys was then planned as a scan of the table (52 ms
-- a list at 3,000 events, 262 ms at 11,000, against 3 ms once analysed), and PostgreSQL
-- failed a list of ~10,000 (54001 "stack depth limit exceeded"). One limit is shared with the batch
-- statement's own lookup: on a table never analysed and still small (~3,000 rows; at 6,000
-- the key's index wins), the planner, which then knows no column's values, costs the
-- tenant's index (events_tenant_received) a hair cheaper and walks the tenant's rows for each
-- key (~0.7 ms a key at 3,000), until autovacuum first analyses it (once 50 rows have
-- changed, at its next round: a minute apart by default).
SELECT k.tenant_id, k.source_id, k.idempotency_key, e.id
FROM unnest(
    CAST(:tenant_ids AS varchar[]),
    CAST(:source_ids AS varchar[]),
    CAST(:idempotency_keys AS varchar[])
) AS k(tenant_id, source_id, idempotency_key)
CROSS JOIN LATERAL (
    SELECT id FROM events
    WHERE tenant_id = k.tenant_id
      AND source_id = k.source_id
      AND idempotency_key = k.idempotency_key
    LIMIT 1
) AS e
