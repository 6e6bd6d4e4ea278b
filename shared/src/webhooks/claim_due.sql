-- Takes up to $1 due deliveries (of job $3 only, when given), oldest due first. Pushing
-- next_attempt_at out by $2 seconds is the attempt's lease: a crashed sender's delivery is due
-- again when it runs out, and nobody else sends it meanwhile.
UPDATE webhook_deliveries d
SET next_attempt_at = now() + make_interval(secs => $2), attempts = d.attempts + 1
FROM (
    SELECT event_id FROM webhook_deliveries
    WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= now()
      AND ($3::uuid IS NULL OR job_id = $3)
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) due, generation_jobs j
WHERE d.event_id = due.event_id AND j.id = d.job_id
RETURNING d.event_id, d.job_id, d.status, d.url, d.attempts, d.created_at, j.user_id, j.tenant_id
