-- Cancels the owner's job if it has not finished. A processing job's worker finds out at its
-- next heartbeat or at completion, both guarded on status, so its result is discarded.
WITH job AS (
    UPDATE generation_jobs
    SET status = 'cancelled',
        lease_expires_at = NULL,
        completed_at = now(),
        updated_at = now()
    -- IS TRUE: by primary key, never by walking the user's in-flight jobs.
    WHERE id = $1 AND user_id = $2 AND tenant_id IS NOT DISTINCT FROM $3
      AND (status IN ('queued', 'processing')) IS TRUE
    RETURNING id, user_id
), released AS (
    UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT id FROM job)
    RETURNING slot
), next_waiting AS (
    -- The slot just freed is owed to the next job in line: its message may be deferred for
    -- minutes, so the caller sends it a fresh one rather than leave the slot idle.
    SELECT w.id FROM waiting_jobs w
    WHERE EXISTS (SELECT 1 FROM released) AND w.user_id NOT IN (
          -- Users at their limit, not counting the slot this statement frees.
          SELECT u.user_id FROM slots_held_by_user u
          WHERE u.held - (SELECT count(*) FROM job WHERE job.user_id = u.user_id) >= $4)
      AND w.id NOT IN (SELECT id FROM job)
    ORDER BY w.fair_key, w.created_at, w.id
    LIMIT 1
)
SELECT job.id, (SELECT id FROM next_waiting) AS next_waiting FROM job
