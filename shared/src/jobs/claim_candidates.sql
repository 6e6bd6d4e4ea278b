-- The embedded queue's next candidates, oldest first: jobs with a reserved slot and due queued
-- jobs. Each is then claimed by id, which decides slots.
SELECT id FROM generation_jobs
WHERE status = 'queued' AND run_after <= now()
ORDER BY created_at, id
LIMIT $1
