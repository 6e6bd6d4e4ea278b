-- A worker takes over the check a checker handed to it with the job's finished output: only
-- while the hand-off's lease ($3, the job's check_taken_until when it was handed) is still the
-- job's, so a second delivery of the message, or one arriving after the lease ran out and
-- another checker took the job, changes nothing. The job is then held for $4 seconds more.
UPDATE generation_jobs j
SET next_check_at = now() + make_interval(secs => $4), checked_at = now(),
    check_taken_until = now() + make_interval(secs => $4)
-- IS TRUE: by primary key, never by walking a partial index of processing jobs.
WHERE id = $1 AND (status = 'processing') IS TRUE AND lease_expires_at IS NULL
  AND attempts = $2 AND check_taken_until = $3::timestamptz
RETURNING j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id, j.params, j.status, j.progress,
          j.result_media_id, j.error_message, j.attempts, j.max_attempts, j.created_at,
          j.started_at, j.completed_at, j.external_job_id, j.submitted_at,
          j.provider_expected_at, j.provider_deadline, j.check_taken_until
