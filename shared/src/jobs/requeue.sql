-- Puts the job back in the queue after a retryable error, not to be claimed before $4, and
-- keeps the attempt's error.
WITH job AS (
    UPDATE generation_jobs
    SET status = 'queued',
        error_message = $3,
        lease_expires_at = NULL,
        run_after = now() + make_interval(secs => $4),
        updated_at = now()
    -- IS TRUE: by primary key, never by walking a partial index of processing jobs.
    WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2
    RETURNING id, user_id, attempts
), released AS (
    UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT id FROM job)
    RETURNING slot
), kept AS (
    INSERT INTO job_errors (job_id, attempt, retryable, message)
    SELECT id, attempts, true, $3 FROM job
    ON CONFLICT (job_id, attempt) DO NOTHING
    RETURNING job_id
), next_waiting AS (
    -- The slot just freed is owed to the next job in line: its message may be deferred for
    -- minutes, so the caller sends it a fresh one rather than leave the slot idle.
    SELECT w.id FROM waiting_jobs w
    WHERE EXISTS (SELECT 1 FROM released) AND w.user_id NOT IN (
          -- Users at their limit, not counting the slot this statement frees.
          SELECT u.user_id FROM slots_held_by_user u
          WHERE u.held - (SELECT count(*) FROM job WHERE job.user_id = u.user_id) >= $5)
      AND w.id NOT IN (SELECT id FROM job)
    ORDER BY w.fair_key, w.created_at, w.id
    LIMIT 1
)
SELECT job.id, (SELECT id FROM next_waiting) AS next_waiting FROM job
