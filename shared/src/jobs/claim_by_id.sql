-- Claims one named job for a worker. Only a queued job can be claimed, so a duplicate or late
-- delivery of the same message finds nothing and runs nothing.
UPDATE generation_jobs
SET status = 'processing',
    attempts = attempts + 1,
    started_at = now(),
    lease_expires_at = now() + make_interval(secs => $2),
    updated_at = now()
WHERE id = $1 AND status = 'queued'
RETURNING id, user_id, tenant_id, job_type, entity_id, params, status, progress, result_media_id, error_message, attempts, max_attempts, created_at, started_at, completed_at
