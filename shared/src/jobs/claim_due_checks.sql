-- Takes up to $1 jobs whose provider check is due, oldest due first. Pushing next_check_at out
-- by $2 seconds is the check's lease: no other poller or status request takes the job meanwhile,
-- and if this checker dies, the job is due again when it runs out.
UPDATE generation_jobs j
SET next_check_at = now() + make_interval(secs => $2), checked_at = now()
FROM (
    SELECT id FROM generation_jobs
    WHERE status = 'processing' AND lease_expires_at IS NULL AND next_check_at <= now()
    ORDER BY next_check_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) due
WHERE j.id = due.id
RETURNING j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id, j.params, j.status, j.progress,
          j.result_media_id, j.error_message, j.attempts, j.max_attempts, j.created_at,
          j.started_at, j.completed_at, j.external_job_id, j.submitted_at,
          j.provider_expected_at, j.provider_deadline
