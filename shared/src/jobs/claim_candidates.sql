-- The embedded queue's next candidates, in the order they are owed a slot: jobs holding a
-- reservation first, then waiting jobs in fair-share order. Each is then claimed by id, which
-- decides.
SELECT q.id FROM generation_jobs q
WHERE q.status = 'queued' AND q.run_after <= now()
ORDER BY NOT EXISTS (SELECT 1 FROM job_slots s WHERE s.job_id = q.id AND s.lease_expires_at > now()),
         q.fair_key, q.created_at, q.id
LIMIT $1
