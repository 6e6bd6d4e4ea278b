-- Retention (V16) deletes jobs, and their media with them. Every media row deleted is checked
-- against generation_jobs.result_media_id, and every job deleted cascades to idempotency_keys:
-- without an index on either column, each check scans that whole table (a review measured 56 s
-- for a purge of 1,000 of 300,000 jobs, 32 ms with the first index). The first costs one index
-- entry per completion; the second one per enqueue that carries an Idempotency-Key.
CREATE INDEX idx_jobs_result_media ON generation_jobs (result_media_id)
    WHERE result_media_id IS NOT NULL;
CREATE INDEX idx_idempotency_keys_job ON idempotency_keys (job_id);
