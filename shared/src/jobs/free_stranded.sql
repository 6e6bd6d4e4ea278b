-- Frees the slots of completed jobs that a completer round could not (claim_batch.sql's
-- `stranded`: another statement held their rows then). Run after the round commits, holding no
-- lock, so it may wait for that statement. A slot given to another job meanwhile no longer
-- names the completed one and is left alone; so is one whose job is, somehow, not finished.
UPDATE job_slots s SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
WHERE s.job_id = ANY ($1)
  AND NOT EXISTS (SELECT 1 FROM generation_jobs j
                  WHERE j.id = s.job_id AND (j.status IN ('queued', 'processing')) IS TRUE)
RETURNING s.slot
