-- A slot whose lease ran out while its job still runs on a worker's lease (the worker stalled,
-- or is gone) is free for a claim to take over, but until one does, the job's heartbeat may
-- renew it; V13 counted it as no longer held. So a user's next job could take another slot
-- under the user's lock, and the stalled job's heartbeat then renew its own without one: the
-- user above their allowance. Such a slot now counts for its user until it is taken over or
-- its job is settled (the rescuer's retry or failure frees it). `held_slots` says which slots
-- are held, once, for both counts: the one under the user's lock and the view every statement
-- reads first (had they differed, a claim could count the user's next job as ahead of others
-- while the lock refused it a slot: a slot idle for all).
-- Not a lapsed reservation (its job is still queued, never started), nor a provider job's kept
-- slot (no heartbeat renews it). A scalar subquery in a CASE looks up only expired slots' jobs,
-- and no plan can turn it into a scan of every processing job.
CREATE VIEW held_slots AS
SELECT s.slot, s.job_id, s.user_id
FROM job_slots s
WHERE s.job_id IS NOT NULL
  AND CASE WHEN s.lease_expires_at > now() THEN true
           ELSE coalesce((SELECT j.status = 'processing' AND j.lease_expires_at IS NOT NULL
                          FROM generation_jobs j WHERE j.id = s.job_id), false) END;

CREATE OR REPLACE VIEW slots_held_by_user AS
SELECT user_id, count(*) AS held FROM held_slots GROUP BY user_id;

CREATE OR REPLACE FUNCTION user_slots_held_locked(users text[], handing_on uuid[])
RETURNS TABLE (user_id text, held bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    k integer;
BEGIN
    IF cardinality(users) = 0 THEN
        RETURN;
    END IF;
    FOR k IN SELECT DISTINCT hashtext(u) FROM unnest(users) u ORDER BY 1 LOOP
        -- The first key names this use of advisory locks; two users may share a lock.
        PERFORM pg_advisory_xact_lock(1970238561, k);
    END LOOP;
    RETURN QUERY
        SELECT h.user_id, count(*) FROM held_slots h
        WHERE h.user_id = ANY (users) AND h.job_id <> ALL (coalesce(handing_on, '{}'))
        GROUP BY h.user_id;
END $$;
