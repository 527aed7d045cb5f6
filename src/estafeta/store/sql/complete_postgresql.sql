-- Record a batch of attempts and apply the transitions workers decided, in one statement.
--
-- `recorded`: every attempt, whatever became of its transition (it did happen).
-- `applied`: each row of the second unnest() is one delivery's transition; it applies only
-- while the worker still holds that delivery's lease (state in_flight and the same lease
-- token), so a result that arrives after the lease expired and another worker took over
-- changes nothing. The outer SELECT counts the transitions applied.
WITH recorded AS (
    INSERT INTO attempts
        (id, tenant_id, delivery_id, number, started_at, duration_ms, outcome, status_code,
         error_class, response_excerpt)
    SELECT *
    FROM unnest(
        CAST(:a_ids AS varchar[]),
        CAST(:a_tenants AS varchar[]),
        CAST(:ids AS varchar[]),
        CAST(:a_numbers AS integer[]),
        CAST(:a_started AS bigint[]),
        CAST(:a_durations AS double precision[]),
        CAST(:a_outcomes AS varchar[]),
        CAST(:a_status_codes AS integer[]),
        CAST(:a_error_classes AS varchar[]),
        CAST(:a_excerpts AS text[])
    )
    RETURNING 1
), applied AS (
    UPDATE deliveries AS d
    SET state = v.state,
        attempts = v.attempts,
        next_attempt_at = v.next_attempt_at,
        last_error = v.last_error,
        lease_token = NULL,
        lease_expires_at = NULL,
        leased_by = NULL,
        updated_at = :now
    FROM unnest(
        CAST(:ids AS varchar[]),
        CAST(:tokens AS varchar[]),
        CAST(:states AS varchar[]),
        CAST(:attempts AS integer[]),
        CAST(:next_attempts AS bigint[]),
        CAST(:errors AS text[])
    ) AS v(id, token, state, attempts, next_attempt_at, last_error)
    WHERE d.id = v.id AND d.lease_token = v.token AND d.state = 'in_flight'
    RETURNING d.id
)
SELECT count(*) FROM applied
