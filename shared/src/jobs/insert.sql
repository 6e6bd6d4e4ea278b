-- Inserts a job and, when a slot is free and no due job is waiting for one, reserves that slot
-- for it ($9 seconds), which makes the answer `direct`: the job starts as soon as a worker
-- takes its message. SKIP LOCKED plus Postgres's re-check of a row updated since the snapshot
-- mean racing enqueues reserve different slots, so no more jobs are answered `direct` than
-- there were free slots. queued_ahead counts the queued jobs before this one (its position - 1).
WITH waiting AS (
    SELECT 1 FROM generation_jobs q
    WHERE q.status = 'queued' AND q.run_after <= now()
      AND NOT EXISTS (SELECT 1 FROM job_slots s WHERE s.job_id = q.id AND s.lease_expires_at > now())
    LIMIT 1
), free AS (
    SELECT slot FROM job_slots
    WHERE slot <= $8 AND (job_id IS NULL OR lease_expires_at <= now())
      AND NOT EXISTS (SELECT 1 FROM waiting)
    ORDER BY slot
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), job AS (
    INSERT INTO generation_jobs (id, user_id, tenant_id, job_type, entity_id, params, max_attempts)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    RETURNING id, created_at
), reserved AS (
    UPDATE job_slots s
    SET job_id = job.id, lease_expires_at = now() + make_interval(secs => $9)
    FROM job, free
    WHERE s.slot = free.slot
    RETURNING s.slot
)
SELECT job.created_at,
       EXISTS (SELECT 1 FROM reserved) AS direct,
       (SELECT count(*) FROM generation_jobs WHERE status = 'queued') AS queued_ahead
FROM job
