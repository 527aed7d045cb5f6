-- Lease up to `limit` due deliveries for one worker, in one statement, fairly across the
-- destinations it names.
--
-- The caller names each destination it may send to now (`destinations`), with the room it
-- has there (`rooms`: its free slots, or what is left of a `max_in_flight`) and how many it
-- is sending there already (`sending`). A destination left out (an open circuit, a spent
-- rate limit) keeps its deliveries without spending attempts.
--
-- `/* due */` is where the store puts the conditions of due.sql (pending, due by now, not
-- waiting behind an earlier delivery of its ordering key), `/* head of its key */` the join
-- to the first pending or in-flight delivery of each row's key they ask about
-- (postgres.py). Best first within a destination: highest priority (0), then oldest due
-- time, then id (ids are time-sortable, so FIFO). Each destination's due rows
-- are read by the partial index deliveries_destination_due as a range scan of that
-- destination alone, so another destination's backlog, however large, is never walked.
--
-- `candidate`: each destination's best due rows, read without locking, up to its room.
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
-- key; RETURNING hands the worker everything it needs to send, including the event's
-- payload, without a second round trip.
--
-- Planning: a LIMIT that names a row's column is a guess to the planner (a tenth of the
-- rows), the same whether the parameters are known or not, so after five runs PostgreSQL
-- keeps the generic plan instead of planning each lease anew (a lease at 1,000,000 waiting
-- took 5.2 ms instead of 3.1 when the candidates' LIMIT was `:limit`). On that guess a join in the
-- UPDATE was planned as a sequential scan (hence the primary-key array) and the statement
-- JIT-compiled on every run (hence `jit = off`, postgres.py). A generic plan made while the
-- tables were nearly empty read both whole once they were not; the lease's connections
-- plan with sequential scans, hash and merge joins off (`_LEASE_PLANNER`, postgres.py).
WITH cap AS (
    SELECT *
    FROM unnest(
            CAST(:destinations AS varchar[]),
            CAST(:rooms AS integer[]),
            CAST(:sending AS integer[])
         ) AS cap(destination_id, room, sending)
), candidate AS (
    SELECT cap.destination_id, c.priority, c.next_attempt_at, c.id,
           cap.sending + row_number() OVER (
               PARTITION BY cap.destination_id ORDER BY c.priority, c.next_attempt_at, c.id
           ) AS level
    FROM cap
    CROSS JOIN LATERAL (
        SELECT d.id, d.priority, d.next_attempt_at
        FROM deliveries AS d
        /* head of its key */
        WHERE d.destination_id = cap.destination_id
          /* due */
        ORDER BY d.priority, d.next_attempt_at, d.id
        LIMIT LEAST(cap.room, :limit)
    ) AS c
), share AS (
    SELECT chosen.destination_id, count(*) AS n
    FROM (
        SELECT destination_id FROM candidate
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
        /* head of its key */
        WHERE d.destination_id = share.destination_id
          /* due */
        ORDER BY d.priority, d.next_attempt_at, d.id
        LIMIT share.n
        FOR UPDATE OF d SKIP LOCKED
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
-- The payload as its UTF-8 bytes, which the worker sends: read as text, the driver
-- decoded it only for the worker to encode it again.
RETURNING d.id, d.tenant_id, d.event_id, d.destination_id, d.attempts, d.max_attempts,
          d.priority, d.ordering_key, d.next_attempt_at, convert_to(e.payload, 'UTF8')
