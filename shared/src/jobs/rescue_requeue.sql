-- Takes a job from an attempt whose lease expired and queues it again, not before $4. Guarded by
-- the attempt and by the lease still being expired, so a worker that renewed in time keeps it.
WITH job AS (
    UPDATE generation_jobs
    SET status = 'queued',
        error_message = $3,
        lease_expires_at = NULL,
        run_after = $4,
        updated_at = now()
    -- IS TRUE: by primary key, never by walking a partial index of processing jobs.
    WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2 AND lease_expires_at < now()
    RETURNING id, attempts
), released AS (
    UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT id FROM job)
    RETURNING slot
), kept AS (
    INSERT INTO job_errors (job_id, attempt, retryable, message)
    SELECT id, attempts, true, $3 FROM job
    ON CONFLICT (job_id, attempt) DO NOTHING
    RETURNING job_id
)
SELECT id FROM job
