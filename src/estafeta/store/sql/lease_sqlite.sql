-- Lease up to `limit` due deliveries for one worker, in one statement, fairly across the
-- destinations it names (see lease_postgresql.sql for the rules, the same here; `/* due */`
-- is where the store puts due.sql's conditions).
--
-- `rooms` is a JSON list of [destination, room, sending]. SQLite has no LATERAL: each
-- destination's best due rows are the IN-list of a correlated subquery, read by the partial
-- index deliveries_destination_due; its LIMIT cannot name the outer row, so it reads up to
-- `limit` and `rank <= room` trims it. SQLite has one writer at a time (the transaction is
-- BEGIN IMMEDIATE), so the subquery and the UPDATE see the same rows and no other process
-- can lease them in between: the single-writer equivalent of FOR UPDATE SKIP LOCKED.
-- RETURNING order is not guaranteed in SQLite; the caller sorts the batch.
UPDATE deliveries
SET state = 'in_flight',
    lease_token = :token,
    lease_expires_at = :deadline,
    leased_by = :worker,
    updated_at = :now
WHERE id IN (
    SELECT picked.id
    FROM (
        SELECT best.id, best.priority, best.next_attempt_at, cap.room,
               row_number() OVER mine AS rank,
               cap.sending + row_number() OVER mine AS level
        FROM (
            SELECT json_extract(value, '$[0]') AS destination_id,
                   json_extract(value, '$[1]') AS room,
                   json_extract(value, '$[2]') AS sending
            FROM json_each(:rooms)
        ) AS cap
        JOIN deliveries AS best ON best.id IN (
            SELECT d.id
            FROM deliveries AS d
            WHERE d.destination_id = cap.destination_id
              /* due */
            ORDER BY d.priority, d.next_attempt_at, d.id
            LIMIT :limit
        )
        WINDOW mine AS (
            PARTITION BY cap.destination_id
            ORDER BY best.priority, best.next_attempt_at, best.id
        )
    ) AS picked
    WHERE picked.rank <= picked.room
    ORDER BY picked.priority, picked.level, picked.next_attempt_at, picked.id
    LIMIT :limit
)
-- The payload as its UTF-8 bytes, which the worker sends: read as text, the driver
-- decoded it only for the worker to encode it again.
RETURNING id, tenant_id, event_id, destination_id, attempts, max_attempts,
          priority, ordering_key, next_attempt_at,
          CAST((SELECT payload FROM events WHERE events.id = deliveries.event_id) AS BLOB)
