-- Claims up to $1 of the oldest queued jobs (the embedded queue). SKIP LOCKED lets concurrent
-- claimers take different rows instead of waiting on each other.
WITH next AS (
    SELECT id FROM generation_jobs
    WHERE status = 'queued'
    ORDER BY created_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE generation_jobs j
SET status = 'processing',
    attempts = j.attempts + 1,
    started_at = now(),
    lease_expires_at = now() + make_interval(secs => $2),
    updated_at = now()
FROM next
WHERE j.id = next.id
RETURNING j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id, j.params, j.status, j.progress, j.result_media_id, j.error_message, j.attempts, j.max_attempts, j.created_at, j.started_at, j.completed_at
