-- Frees the slots held by these jobs: those a completion kept for a claim that then did not
-- run or failed.
UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
WHERE job_id = ANY ($1)
