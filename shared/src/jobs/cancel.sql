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
