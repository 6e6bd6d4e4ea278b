-- Measured with EXPLAIN ANALYZE on 10,000 queued jobs (issue 7):
-- * idx_jobs_status (the seed's) is updated on every state change, and the generic plan of the
--   completion statement chose it over the primary key to find one job by id. Every query that
--   filters on status is served by the partial indexes instead (queued order, leases, provider
--   checks, a user's jobs in flight); the poller's per-status count scans the table once a minute.
DROP INDEX idx_jobs_status;
-- * The views of held slots scanned all 1,000 slot rows on every claim and completion to find
--   the few held ones; this index holds only those.
CREATE INDEX idx_slots_held ON job_slots (job_id) INCLUDE (lease_expires_at) WHERE job_id IS NOT NULL;
