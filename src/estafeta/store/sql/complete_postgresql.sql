-- Record a batch of attempts and apply the transitions workers decided, in one statement.
--
-- The batch comes as one JSON text, one object per attempt (see store_batch_postgresql.sql
-- for why JSON); `done` parses it once.
-- `recorded`: every attempt, whatever became of its transition (it did happen).
-- `applied`: each attempt's delivery takes its transition only while the worker still holds
-- that delivery's lease (state in_flight and the same lease token), so a result that arrives
-- after the lease expired and another worker took over changes nothing. The outer SELECT
-- counts the transitions applied and names the deliveries they dead-lettered (the workers
-- count those, not the deaths they decided).
WITH done AS MATERIALIZED (
    SELECT *
    FROM json_to_recordset(CAST(convert_from(CAST(:attempts AS bytea), 'UTF8') AS json)) AS a(
        id varchar, tenant_id varchar, delivery_id varchar, number integer,
        started_at bigint, duration_ms double precision, outcome varchar,
        status_code integer, error_class varchar, response_excerpt text,
        lease_token varchar, state varchar, attempts integer, max_attempts integer,
        next_attempt_at bigint, last_error text
    )
), recorded AS (
    INSERT INTO attempts
        (id, tenant_id, delivery_id, number, started_at, duration_ms, outcome, status_code,
         error_class, response_excerpt)
    SELECT id, tenant_id, delivery_id, number, started_at, duration_ms, outcome,
           status_code, error_class, response_excerpt
    FROM done
    -- A record sent again because its first commit's answer was lost: written once.
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
), applied AS (
    UPDATE deliveries AS d
    SET state = v.state,
        attempts = v.attempts,
        max_attempts = v.max_attempts,  -- the limit decided with (the configuration's)
        next_attempt_at = v.next_attempt_at,
        last_error = v.last_error,
        lease_token = NULL,
        lease_expires_at = NULL,
        leased_by = NULL,
        updated_at = :now
    FROM done AS v
    WHERE d.id = v.delivery_id AND d.lease_token = v.lease_token AND d.state = 'in_flight'
    RETURNING d.id, d.state
)
SELECT count(*), coalesce(array_agg(id) FILTER (WHERE state = 'dead'), '{}') FROM applied
