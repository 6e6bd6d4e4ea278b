-- Takes up to $1 jobs whose provider check is due, oldest due first, each for $2 seconds
-- (check_taken_until): no other poller, status request or callback takes the job meanwhile.
-- next_check_at is pushed out as far, so that if this checker dies, the job falls due again
-- when the lease runs out.
UPDATE generation_jobs j
SET next_check_at = now() + make_interval(secs => $2), checked_at = now(),
    check_taken_until = now() + make_interval(secs => $2)
FROM (
    SELECT id FROM generation_jobs
    WHERE status = 'processing' AND lease_expires_at IS NULL AND next_check_at <= now()
      AND (check_taken_until IS NULL OR check_taken_until <= now())
    ORDER BY next_check_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) due
WHERE j.id = due.id
RETURNING j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id, j.params, j.status, j.progress,
          j.result_media_id, j.error_message, j.attempts, j.max_attempts, j.created_at,
          j.started_at, j.completed_at, j.external_job_id, j.submitted_at,
          j.provider_expected_at, j.provider_deadline, j.provider_outputs
