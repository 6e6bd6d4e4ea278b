-- A worker takes a job handed to it to collect, for $3 seconds: only the attempt ($2) handed,
-- and only while no collection holds it. Any message for the job may take it, so one that
-- arrives late (behind a queue's backlog) still collects; of two copies of one message, or a
-- message and its re-sent successor, the first collects and the other finds the job held, or
-- finished.
UPDATE generation_jobs j
SET next_check_at = now() + make_interval(secs => $3), checked_at = now(),
    check_taken_until = now() + make_interval(secs => $3)
-- IS TRUE: by primary key, never by walking a partial index of processing jobs.
WHERE id = $1 AND (status = 'processing') IS TRUE AND lease_expires_at IS NULL
  AND attempts = $2 AND provider_outputs IS NOT NULL
  AND (check_taken_until IS NULL OR check_taken_until <= now())
RETURNING j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id, j.params, j.status, j.progress,
          j.result_media_id, j.error_message, j.attempts, j.max_attempts, j.created_at,
          j.started_at, j.completed_at, j.external_job_id, j.submitted_at,
          j.provider_expected_at, j.provider_deadline, j.provider_outputs
