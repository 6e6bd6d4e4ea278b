-- A user's allowance (MAX_ACTIVE_PER_USER) held only within one process. Every statement that
-- gives a user a slot counted that user's held slots in its own snapshot, so two of them at
-- once (two Lambda workers claiming two of one user's jobs, a direct enqueue beside the
-- embedded queue's claim, two local servers) each missed the other's slot and could both take
-- one: a user at one below the limit could end up above it. Nothing in one statement can see
-- what another commits after its snapshot was taken, so these statements now call this
-- function where the allowance can bind (a limit below the number of slots): it takes a
-- transaction-scoped lock per user, in one fixed order so that two callers never wait for each
-- other's user locks in a cycle (and, holding them, they wait for no job or slot row), and only
-- then counts, in a snapshot of its own (a VOLATILE function's query takes a new one), the
-- slots those users hold, less the slots of `handing_on` jobs (whose slots the calling
-- statement hands to other jobs). A statement that gave one of these users a
-- slot has committed before its lock is released, so the count sees it; one that has not yet
-- taken the lock waits for this statement's commit and then sees this one's.
CREATE FUNCTION user_slots_held_locked(users text[], handing_on uuid[])
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
        WHERE s.user_id = ANY (users) AND s.job_id IS NOT NULL AND s.lease_expires_at > now()
          AND s.job_id <> ALL (coalesce(handing_on, '{}'))
        GROUP BY s.user_id;
END $$;
