-- Frees the slots held by these jobs: those a completer round's completions kept for a claim
-- it then had no job to make.
UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
WHERE job_id = ANY ($1)
