-- Fails the job for good, fenced by the attempt that ran it.
UPDATE generation_jobs
SET status = 'failed',
    error_message = $3,
    lease_expires_at = NULL,
    completed_at = now(),
    updated_at = now()
WHERE id = $1 AND status = 'processing' AND attempts = $2
RETURNING completed_at
