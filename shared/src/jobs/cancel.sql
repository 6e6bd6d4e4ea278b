-- Cancels the owner's job if it has not finished. A processing job's worker finds out at its
-- next heartbeat or at completion, both guarded on status, so its result is discarded.
WITH job AS (
    UPDATE generation_jobs
    SET status = 'cancelled',
        lease_expires_at = NULL,
        completed_at = now(),
        updated_at = now()
    WHERE id = $1 AND user_id = $2 AND tenant_id IS NOT DISTINCT FROM $3
      AND status IN ('queued', 'processing')
    RETURNING id
), released AS (
    UPDATE job_slots SET job_id = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT id FROM job)
    RETURNING slot
)
SELECT id FROM job
