-- Claims one named job for a worker: only a queued job that is due, and only with a slot: the
-- one reserved for it at enqueue, or a free one. The job row and the slot row change in one
-- statement, so a duplicate delivery finds nothing to claim and no slot is taken twice.
WITH mine AS (
    SELECT slot FROM job_slots WHERE job_id = $1 AND lease_expires_at > now()
    FOR UPDATE
), free AS (
    SELECT slot FROM job_slots
    WHERE slot <= $3 AND (job_id IS NULL OR lease_expires_at <= now())
      AND NOT EXISTS (SELECT 1 FROM mine)
    ORDER BY slot
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT slot FROM mine UNION ALL SELECT slot FROM free
), claimed AS (
    UPDATE generation_jobs
    SET status = 'processing',
        attempts = attempts + 1,
        started_at = now(),
        lease_expires_at = now() + make_interval(secs => $2),
        updated_at = now()
    WHERE id = $1 AND status = 'queued' AND run_after <= now() AND EXISTS (SELECT 1 FROM chosen)
    RETURNING id, user_id, tenant_id, job_type, entity_id, params, status, progress, result_media_id, error_message, attempts, max_attempts, created_at, started_at, completed_at, lease_expires_at
), held AS (
    UPDATE job_slots s
    SET job_id = claimed.id, lease_expires_at = claimed.lease_expires_at
    FROM claimed
    WHERE s.slot = (SELECT slot FROM chosen LIMIT 1)
    RETURNING s.slot
)
SELECT claimed.*, (SELECT slot FROM held) AS slot FROM claimed
