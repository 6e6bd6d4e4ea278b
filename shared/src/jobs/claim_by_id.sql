-- Claims one named job for a worker: only a queued job that is due, and only while fewer than
-- $3 jobs hold live leases. Runs in a transaction holding the claim lock, so two claimers can
-- never both take the last slot. A duplicate or late delivery finds nothing to claim.
WITH active AS (
    SELECT count(*) AS n FROM generation_jobs WHERE status = 'processing' AND lease_expires_at > now()
)
UPDATE generation_jobs
SET status = 'processing',
    attempts = attempts + 1,
    started_at = now(),
    lease_expires_at = now() + make_interval(secs => $2),
    updated_at = now()
WHERE id = $1 AND status = 'queued' AND run_after <= now() AND (SELECT n FROM active) < $3
RETURNING id, user_id, tenant_id, job_type, entity_id, params, status, progress, result_media_id, error_message, attempts, max_attempts, created_at, started_at, completed_at
