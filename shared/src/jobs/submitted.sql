-- The provider accepted the job and will finish it later. The attempt stops holding a lease:
-- from here the job is followed by checks, due at next_check_at, and fails at its deadline.
-- Unless long jobs are configured to hold slots ($7), the slot goes to the next job in line.
WITH job AS (
    UPDATE generation_jobs
    SET external_job_id = $3,
        submitted_at = now(),
        provider_expected_at = now() + make_interval(secs => $4),
        provider_deadline = now() + make_interval(secs => $5),
        next_check_at = now() + make_interval(secs => $6),
        checked_at = now(),
        check_taken_until = NULL,
        provider_outputs = NULL,
        progress = GREATEST(progress, 10),
        lease_expires_at = NULL,
        updated_at = now()
    -- IS TRUE: by primary key, never by walking a partial index of processing jobs.
    WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2 AND lease_expires_at IS NOT NULL
    RETURNING id, user_id, provider_deadline
), kept AS (
    UPDATE job_slots s SET lease_expires_at = job.provider_deadline + interval '5 minutes'
    FROM job WHERE $7 AND s.job_id = job.id
    RETURNING s.slot
), released AS (
    UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    WHERE NOT $7 AND job_id IN (SELECT id FROM job)
    RETURNING slot
), next_waiting AS (
    -- The slot just freed is owed to the next job in line: its message may be deferred for
    -- minutes, so the caller sends it a fresh one rather than leave the slot idle.
    SELECT w.id FROM waiting_jobs w
    WHERE EXISTS (SELECT 1 FROM released) AND w.user_id NOT IN (
          -- Users at their limit, not counting the slot this statement frees.
          SELECT u.user_id FROM slots_held_by_user u
          WHERE u.held - (SELECT count(*) FROM job WHERE job.user_id = u.user_id) >= $8)
      AND w.id NOT IN (SELECT id FROM job)
    ORDER BY w.fair_key, w.created_at, w.id
    LIMIT 1
)
SELECT job.id, (SELECT id FROM next_waiting) AS next_waiting FROM job
