-- Lease up to `limit` due deliveries for one worker, in one statement.
--
-- SQLite has one writer at a time (the transaction is BEGIN IMMEDIATE), so the subquery and
-- the UPDATE see the same rows and no other process can lease them in between: that is the
-- single-writer equivalent of FOR UPDATE SKIP LOCKED. Order: highest priority (0) first,
-- then oldest due time, then id (time-sortable, so FIFO within a priority). Skipped, as on
-- PostgreSQL: destinations named in `blocked` (open circuit, spent rate limit), and a
-- delivery with an ordering key while an earlier one with the same key to the same
-- destination is pending or in flight. RETURNING order is not guaranteed in SQLite, so the
-- caller sorts the batch by (priority, next_attempt_at, id).
UPDATE deliveries
SET state = 'in_flight',
    lease_token = :token,
    lease_expires_at = :deadline,
    leased_by = :worker,
    updated_at = :now
WHERE id IN (
    SELECT d.id
    FROM deliveries AS d
    WHERE d.state = 'pending'
      AND d.next_attempt_at <= :now
      AND d.destination_id NOT IN :blocked
      /* only */
      AND (d.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM deliveries AS head
            WHERE head.destination_id = d.destination_id
              AND head.ordering_key = d.ordering_key
              AND head.state IN ('pending', 'in_flight')
              AND head.id < d.id))
    ORDER BY d.priority, d.next_attempt_at, d.id
    LIMIT :limit
)
RETURNING id, tenant_id, event_id, destination_id, attempts, max_attempts,
          priority, ordering_key, next_attempt_at,
          (SELECT payload FROM events WHERE events.id = deliveries.event_id) AS payload
