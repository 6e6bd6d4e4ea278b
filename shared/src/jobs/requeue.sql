-- Puts the job back in the queue after a retryable error, not to be claimed before $4, and
-- keeps the attempt's error.
WITH job AS (
    UPDATE generation_jobs
    SET status = 'queued',
        error_message = $3,
        lease_expires_at = NULL,
        run_after = now() + make_interval(secs => $4),
        updated_at = now()
    WHERE id = $1 AND status = 'processing' AND attempts = $2
    RETURNING id, attempts
), released AS (
    UPDATE job_slots SET job_id = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT id FROM job)
    RETURNING slot
), kept AS (
    INSERT INTO job_errors (job_id, attempt, retryable, message)
    SELECT id, attempts, true, $3 FROM job
    ON CONFLICT (job_id, attempt) DO NOTHING
    RETURNING job_id
), next_waiting AS (
    -- The slot just freed is for the oldest job waiting for one: its message may be deferred
    -- for minutes, so the caller sends it a fresh one rather than leave the slot idle.
    SELECT q.id FROM generation_jobs q
    WHERE q.status = 'queued' AND q.run_after <= now() AND EXISTS (SELECT 1 FROM released)
      AND q.id NOT IN (SELECT id FROM job)
      AND NOT EXISTS (SELECT 1 FROM job_slots s WHERE s.job_id = q.id AND s.lease_expires_at > now())
    ORDER BY q.created_at, q.id
    LIMIT 1
)
SELECT job.id, (SELECT id FROM next_waiting) AS next_waiting FROM job
