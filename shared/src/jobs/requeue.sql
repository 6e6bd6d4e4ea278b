-- Puts the job back in the queue after a retryable error, keeping that error for the record.
UPDATE generation_jobs
SET status = 'queued',
    error_message = $3,
    lease_expires_at = NULL,
    updated_at = now()
WHERE id = $1 AND status = 'processing' AND attempts = $2
RETURNING updated_at
