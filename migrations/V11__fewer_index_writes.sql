-- Measured (issue 7): every index on a table is written by each insert and by each update that
-- is not HOT, and each of these three duplicated another index the same statements can use.
-- * The outbox's created_at order of queued jobs: it now walks the line's own index, in line
--   order (which is also the order their messages matter in). One index write less per enqueue.
DROP INDEX idx_jobs_queued_fifo;
-- * A job's media by job_id: the unique (job_id, ordinal) index leads with job_id. One index
--   write less per completion.
DROP INDEX idx_media_job;
-- * Held slots: the unique job_id index finds them too (`job_id IS NOT NULL` is an index
--   condition there). One index write less each time a slot is taken. Some generic plans of
--   the waiting-job checks now scan the 1,000 slot rows instead (about 0.15 ms a claim here),
--   and still, draining 10,000 jobs with 20 workers measured faster without it in each of four
--   interleaved runs (2,264-2,707 against 1,780-1,987 jobs/s), with 100 bytes of WAL less per job.
DROP INDEX idx_slots_held;
