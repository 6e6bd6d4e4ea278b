-- Deletes up to $2 jobs that settled (completed, failed, cancelled) more than $1 days ago,
-- oldest first, with what belongs to them (media rows, attempt errors, run times,
-- webhook deliveries: ON DELETE CASCADE). A job settles after it was created, so they are
-- found by a range of the primary key (V16) and then by when they settled. Answers
-- how many, and the storage keys of their locally stored files for the store to remove; a file
-- in a user's Google Drive is the user's and stays.
WITH old AS (
    SELECT id FROM generation_jobs
    WHERE id < uuid_v7_floor(now() - make_interval(days => $1::int4))
      AND status IN ('completed', 'failed', 'cancelled')
      AND completed_at < now() - make_interval(days => $1::int4)
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM generation_jobs j USING old WHERE j.id = old.id RETURNING j.id
)
SELECT (SELECT count(*) FROM gone) AS jobs,
       ARRAY(SELECT m.storage_key FROM generated_media m
             WHERE m.job_id IN (SELECT id FROM gone) AND m.storage = 'local') AS local_keys
