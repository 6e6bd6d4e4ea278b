-- The abuse limits (RATE_LIMIT_PER_MINUTE, MAX_QUEUED_PER_USER) were counted in the enqueue
-- statement's own snapshot, so requests of one user arriving together each missed the others'
-- jobs: 24 at once against a limit of 3 queued let 5-7 through (and against 5 a minute, 8), and
-- such requests could share one fair-share place. As V13 does for the per-user allowance, the
-- enqueue now calls this function where a limit is on: it takes the user's transaction-scoped
-- lock (the same lock as V13's, so an enqueue that also counts the allowance takes no second
-- one) and only then counts, in a snapshot of its own (a VOLATILE function's query takes a new
-- one), the user's jobs of the last minute, those waiting, and the user's last place in line. An
-- enqueue of the same user that took the lock before has committed by the time this one gets
-- it, so the counts see its job; the next waits for this one's commit. Enqueues of different
-- users never wait for each other (two users may share a lock, as in V13).
CREATE FUNCTION user_quota_locked(p_user text, per_minute bigint, max_queued bigint)
RETURNS TABLE (recent_jobs bigint, recent_oldest timestamptz, queued bigint, last_key bigint)
-- One row, said so: at the default guess of 1,000, pgbench's prepared run of the enqueue
-- statement (planned per execution; the service's connections force generic plans, db.rs)
-- fell from 3,650 a second with the generic plan forced to 1,070; with ROWS 1, 3,805-3,988.
LANGUAGE plpgsql VOLATILE ROWS 1 AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1970238561, hashtext(p_user));
    RETURN QUERY
    SELECT r.n, r.oldest,
           -- No LIMIT, and the in-flight index named: see insert.sql (mine_queued).
           (SELECT count(*) FROM generation_jobs j
            WHERE max_queued > 0 AND j.user_id = p_user
              AND j.status IN ('queued', 'processing') AND (j.status = 'queued') IS TRUE),
           (SELECT max(j.fair_key) FROM generation_jobs j
            WHERE j.user_id = p_user AND j.status IN ('queued', 'processing'))
    FROM (SELECT count(*) AS n, min(c.created_at) AS oldest FROM (
              SELECT j.created_at FROM generation_jobs j
              WHERE per_minute > 0 AND j.user_id = p_user
                AND j.created_at > now() - interval '60 seconds'
              ORDER BY j.created_at DESC LIMIT per_minute) c) r;
END $$;
