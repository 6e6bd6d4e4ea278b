-- Claims the oldest due queued jobs (the embedded queue): at most $1, and no more than the
-- slots left free by the $3 allowed live leases. Runs under the claim lock.
WITH active AS (
    SELECT count(*) AS n FROM generation_jobs WHERE status = 'processing' AND lease_expires_at > now()
), next AS (
    SELECT id FROM generation_jobs
    WHERE status = 'queued' AND run_after <= now()
    ORDER BY created_at, id
    LIMIT greatest(0, least($1, $3 - (SELECT n FROM active)))
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
