-- A reservation that ran out (the `direct` job's worker came later than RESERVATION) leaves its
-- slot row naming the job. When the job was then claimed with a different free slot, the unique
-- job_id made the claim fail, every time: the embedded queue's batch claim failed as a whole and
-- no job started until some enqueue happened to reuse that slot (measured: a 30,000-job drain
-- with 5 workers stalled for good). Claims now free such a row in the statement that gives the
-- job its new slot. The two rows change in one statement, in no fixed order, so uniqueness is
-- checked at the end of the statement rather than row by row; it still holds at every commit,
-- and statements from before this migration see no difference.
ALTER TABLE job_slots
    DROP CONSTRAINT job_slots_job_id_key,
    ADD CONSTRAINT job_slots_job_id_key UNIQUE (job_id) DEFERRABLE INITIALLY IMMEDIATE;
