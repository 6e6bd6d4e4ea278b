-- A slot whose lease ran out while its job still runs (its worker stalled, or is gone) is free
-- for a claim to take over, but until one does, the job's heartbeat may renew it; V13 counted it
-- as no longer held. So a user's next job could take another slot under the user's lock, and the
-- stalled job's heartbeat then renew its own without one: the user above their allowance. Such a
-- slot now counts for its user until it is taken over or its job is settled (the rescuer's
-- retry or failure frees it). Only a processing job's: a lapsed reservation belongs to a job
-- that is still queued and never started.
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
        SELECT s.user_id, count(*) FROM job_slots s
        WHERE s.user_id = ANY (users) AND s.job_id IS NOT NULL
          AND (s.lease_expires_at > now()
               OR EXISTS (SELECT 1 FROM generation_jobs j
                          WHERE j.id = s.job_id AND (j.status = 'processing') IS TRUE))
          AND s.job_id <> ALL (coalesce(handing_on, '{}'))
        GROUP BY s.user_id;
END $$;
