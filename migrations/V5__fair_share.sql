-- Fair share. Each job gets an ordering key at enqueue: one more than its user's newest job in
-- flight, but never less than the key at the head of the queue. Claims, hand-offs and positions
-- all follow (fair_key, created_at, id), so a user's hundredth job waits behind everyone
-- else's first, and a newcomer's first job goes to the head's tier instead of the back.
ALTER TABLE generation_jobs ADD COLUMN fair_key bigint NOT NULL DEFAULT 0;
CREATE INDEX idx_jobs_queued_fair ON generation_jobs (fair_key, created_at, id) WHERE status = 'queued';
CREATE INDEX idx_jobs_user_in_flight ON generation_jobs (user_id, fair_key) WHERE status IN ('queued', 'processing');

-- Slots held right now (reserved or running), per user: a handful of rows at most.
CREATE VIEW slots_held_by_user AS
SELECT h.user_id, count(*) AS held
FROM job_slots s JOIN generation_jobs h ON h.id = s.job_id
WHERE s.lease_expires_at > now()
GROUP BY h.user_id;

-- Jobs waiting for a slot: queued, due, and not holding a reservation.
CREATE VIEW waiting_jobs AS
SELECT q.id, q.user_id, q.fair_key, q.created_at
FROM generation_jobs q
WHERE q.status = 'queued' AND q.run_after <= now()
  AND NOT EXISTS (SELECT 1 FROM job_slots s WHERE s.job_id = q.id AND s.lease_expires_at > now());
