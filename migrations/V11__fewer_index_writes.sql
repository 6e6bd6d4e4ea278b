-- Measured (issue 7): every index on a table is written by each insert and by each update that
-- is not HOT, and each of these two duplicated another index the same statements can use.
-- * The outbox's created_at order of queued jobs: it now walks the line's own index, in line
--   order (which is also the order their messages matter in). One index write less per enqueue.
DROP INDEX idx_jobs_queued_fifo;
-- * A job's media by job_id: the unique (job_id, ordinal) index leads with job_id. One index
--   write less per completion.
DROP INDEX idx_media_job;
-- idx_slots_held stays although the unique job_id index could find held slots too: without it
-- the generic plans of the waiting-job checks scan all 1,000 slot rows, which costs a claim
-- about what the index write it saves does.
