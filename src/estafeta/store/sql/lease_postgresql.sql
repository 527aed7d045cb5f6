-- Lease up to `limit` due deliveries for one worker, in one statement.
--
-- The CTE picks pending rows that are due, highest priority (0) first, then oldest due time,
-- then id (ids are time-sortable, so FIFO within a priority). It skips:
--   * destinations the caller names in `blocked` (an open circuit breaker, a spent rate
--     limit): their deliveries wait without spending attempts;
--   * a delivery with an ordering key while an earlier delivery with the same key to the same
--     destination is still pending or in flight: one key goes strictly one after another,
--     and a failing head blocks its own key only.
-- FOR UPDATE SKIP LOCKED makes concurrent workers skip rows another worker is leasing right
-- now instead of waiting on them, so N workers lease N disjoint batches. The UPDATE marks
-- them in_flight with a lease token and deadline; RETURNING hands the worker everything it
-- needs to send, including the event's payload, without a second round trip. The partial
-- index deliveries_lease serves the CTE as an index range scan, deliveries_ordering the NOT
-- EXISTS. The `/* only */` marker is where postgres.each_destination adds its destination,
-- to lease named destinations (a circuit's probe, the capped ones) by
-- deliveries_destination_due, all in one statement.
WITH due AS (
    SELECT d.id
    FROM deliveries AS d
    WHERE d.state = 'pending'
      AND d.next_attempt_at <= :now
      AND d.destination_id <> ALL(CAST(:blocked AS varchar[]))
      /* only */
      AND (d.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM deliveries AS head
            WHERE head.destination_id = d.destination_id
              AND head.ordering_key = d.ordering_key
              AND head.state IN ('pending', 'in_flight')
              AND head.id < d.id))
    ORDER BY d.priority, d.next_attempt_at, d.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries AS d
SET state = 'in_flight',
    lease_token = :token,
    lease_expires_at = :deadline,
    leased_by = :worker,
    updated_at = :now
FROM due, events AS e
WHERE d.id = due.id AND e.id = d.event_id
RETURNING d.id, d.tenant_id, d.event_id, d.destination_id, d.attempts, d.max_attempts,
          d.priority, d.ordering_key, d.next_attempt_at, e.payload
