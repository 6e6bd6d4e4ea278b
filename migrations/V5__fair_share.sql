-- Fair share. Each job gets an ordering key at enqueue: one more than its user's newest job in
-- flight, but never less than the key at the head of the queue. Claims, hand-offs and positions
-- all follow (fair_key, created_at, id), so a user's hundredth job waits behind everyone
-- else's first, and a newcomer's first job goes to the head's tier instead of the back.
ALTER TABLE generation_jobs ADD COLUMN fair_key bigint NOT NULL DEFAULT 0;
CREATE INDEX idx_jobs_queued_fair ON generation_jobs (fair_key, created_at, id) WHERE status = 'queued';
CREATE INDEX idx_jobs_user_in_flight ON generation_jobs (user_id, fair_key) WHERE status IN ('queued', 'processing');

-- Jobs waiting for a slot: queued, due, and not holding a reservation; with how many slots
-- their user holds now (for the per-user limit).
CREATE VIEW waiting_jobs AS
SELECT q.id, q.user_id, q.fair_key, q.created_at,
       (SELECT count(*) FROM job_slots s JOIN generation_jobs h ON h.id = s.job_id
        WHERE s.lease_expires_at > now() AND h.user_id = q.user_id) AS user_holding
FROM generation_jobs q
WHERE q.status = 'queued' AND q.run_after <= now()
  AND NOT EXISTS (SELECT 1 FROM job_slots s WHERE s.job_id = q.id AND s.lease_expires_at > now());
