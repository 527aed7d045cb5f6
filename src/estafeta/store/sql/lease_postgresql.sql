-- Lease up to `limit` due deliveries for one worker, in one statement, fairly across the
-- destinations it names.
--
-- The caller names each destination it may send to now (`destinations`), with the room it
-- has there (`rooms`: its free slots, or what is left of a `max_in_flight`) and how many it
-- is sending there already (`sending`). A destination left out (an open circuit, a spent
-- rate limit) keeps its deliveries without spending attempts.
--
-- `/* due */` is where the store puts the conditions of due.sql (pending, due by now, not
-- waiting behind an earlier delivery of its ordering key). Best first within a
-- destination: highest priority (0), then
-- oldest due time, then id (ids are time-sortable, so FIFO). Each destination's due rows
-- are read by the partial index deliveries_destination_due as a range scan of that
-- destination alone, so another destination's backlog, however large, is never walked.
--
-- `candidate`: each destination's best due rows, read without locking, up to `limit` (a
-- LIMIT naming the row's room would leave the planner to guess a tenth of the backlog),
-- `rank <= room` trimming them to the room.
-- `share`: how many each destination gets: the best `limit` candidates by priority, then
-- by `level`, the number the destination would have in flight with that row. Slots go to
-- the destinations with the fewest sends first, so a slow destination's backlog cannot
-- hold every slot while another destination's deliveries wait behind it; when only one
-- destination has work, it gets every slot.
-- `due`: each destination's best due rows again, that many, FOR UPDATE SKIP LOCKED: rows
-- another worker is leasing right now are skipped for the next ones instead of waited on,
-- so N workers lease N disjoint batches, and none locks rows it will not take (locking the
-- candidates themselves left concurrent workers short by what the others had read).
--
-- The UPDATE marks them in_flight with a lease token and deadline, finding them by primary
-- key (an array: a join here was planned on a guess, as a sequential scan); RETURNING hands
-- the worker everything it needs to send, including the event's payload, without a second
-- round trip.
WITH cap AS (
    SELECT *
    FROM unnest(
            CAST(:destinations AS varchar[]),
            CAST(:rooms AS integer[]),
            CAST(:sending AS integer[])
         ) AS cap(destination_id, room, sending)
), candidate AS (
    SELECT cap.destination_id, c.priority, c.next_attempt_at, c.id, cap.room,
           row_number() OVER mine AS rank,
           cap.sending + row_number() OVER mine AS level
    FROM cap
    CROSS JOIN LATERAL (
        SELECT d.id, d.priority, d.next_attempt_at
        FROM deliveries AS d
        WHERE d.destination_id = cap.destination_id
          /* due */
        ORDER BY d.priority, d.next_attempt_at, d.id
        LIMIT :limit
    ) AS c
    WINDOW mine AS (PARTITION BY cap.destination_id ORDER BY c.priority, c.next_attempt_at, c.id)
), share AS (
    SELECT chosen.destination_id, count(*) AS n
    FROM (
        SELECT destination_id FROM candidate
        WHERE rank <= room
        ORDER BY priority, level, next_attempt_at, id
        LIMIT :limit
    ) AS chosen
    GROUP BY chosen.destination_id
), due AS (
    SELECT taken.id
    FROM share
    CROSS JOIN LATERAL (
        SELECT d.id
        FROM deliveries AS d
        WHERE d.destination_id = share.destination_id
          /* due */
        ORDER BY d.priority, d.next_attempt_at, d.id
        LIMIT share.n
        FOR UPDATE SKIP LOCKED
    ) AS taken
)
UPDATE deliveries AS d
SET state = 'in_flight',
    lease_token = :token,
    lease_expires_at = :deadline,
    leased_by = :worker,
    updated_at = :now
FROM events AS e
WHERE d.id = ANY(ARRAY(SELECT id FROM due)) AND e.id = d.event_id
RETURNING d.id, d.tenant_id, d.event_id, d.destination_id, d.attempts, d.max_attempts,
          d.priority, d.ordering_key, d.next_attempt_at, e.payload
