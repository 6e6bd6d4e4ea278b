-- Takes one waiting job for a check outside the poller (a status request, a provider callback),
-- for $3 seconds, only if no other check holds it, nobody asked the provider about it in the
-- last $2 seconds, it is not already handed to a worker to collect (the poller re-sends those)
-- and, for a callback, only for the attempt ($4) it names.
UPDATE generation_jobs j
SET next_check_at = now() + make_interval(secs => $3), checked_at = now(),
    check_taken_until = now() + make_interval(secs => $3)
-- IS TRUE: by primary key, never by walking a partial index of processing jobs.
WHERE id = $1 AND (status = 'processing') IS TRUE AND lease_expires_at IS NULL
  AND checked_at <= now() - make_interval(secs => $2)
  AND (check_taken_until IS NULL OR check_taken_until <= now())
  AND provider_outputs IS NULL
  AND ($4::int4 IS NULL OR attempts = $4)
RETURNING j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id, j.params, j.status, j.progress,
          j.result_media_id, j.error_message, j.attempts, j.max_attempts, j.created_at,
          j.started_at, j.completed_at, j.external_job_id, j.submitted_at,
          j.provider_expected_at, j.provider_deadline, j.provider_outputs
