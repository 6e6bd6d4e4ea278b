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
--   and still, draining 10,000 jobs with 20 workers measured faster without it in both of two
--   interleaved pairs of runs (2,707 and 2,264 against 1,780 and 1,987 jobs/s), with 100 bytes
--   of WAL less per job.
DROP INDEX idx_slots_held;

-- The trigger that kept a slot's user_id right for statements from before V9: every statement
-- since sets user_id with job_id, and the previous release is the oldest code that runs on this
-- schema. It fired each time a slot passed between two jobs of one user, as the completer's
-- hand-over now does (a function call and a job lookup per slot). A CHECK holds what it kept.
DROP TRIGGER job_slot_user ON job_slots;
DROP FUNCTION job_slot_user();
ALTER TABLE job_slots
    ADD CONSTRAINT held_slots_name_their_user CHECK ((job_id IS NULL) = (user_id IS NULL));
