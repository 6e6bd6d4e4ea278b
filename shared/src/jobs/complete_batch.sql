-- Follows completions.sql (the embedded queue's completions alone): frees the completed jobs'
-- slots. No next-in-line is named: the embedded claimer takes freed slots from the table itself.
, released AS (
    UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT id FROM done)
    RETURNING slot
)
SELECT done.id FROM done
