-- Inserts a job with its fair-share key and, when a slot is free, no eligible job is waiting
-- for one, and its user holds fewer than $10 slots, reserves that slot for it ($9 seconds):
-- the answer is then `direct`, and the job starts as soon as a worker takes its message. SKIP
-- LOCKED plus Postgres's re-check of a row changed since the snapshot mean racing enqueues
-- reserve different slots, so no more jobs are answered `direct` than there were free slots.
-- queued_ahead counts the queued jobs that will start before this one (its position - 1); 0
-- when direct. It sums the shorter side of the job, judged by its key's distance from the
-- line's two ends, from the per-level counts (queue_levels, V20): the levels up to its own,
-- which it joins last, or all queued jobs (queue_tally) less the levels behind it.
-- With $13 (a lease in seconds: a local worker stands ready) a job given a slot does not wait
-- for a claim: it is inserted already claimed (attempt 1, leased for $13 seconds, and so is its
-- slot), which saves a statement and a commit before it starts. started_at says so.
-- Abuse limits come first: a user who created $11 jobs in the last minute, or has $12 queued,
-- gets no row inserted; recent_jobs and recent_oldest then say which limit and for how long.
-- A limit of 0 is off. Where one is on, the user's counts and last place in line are taken
-- under the user's lock, in a snapshot of their own (V17), so that requests of one user
-- arriving together are counted one after another; with both off the function is not called.
-- In user_quota_locked's counts, no LIMIT on the queued one: with one, a generic plan guesses
-- a tenth of the table and scans it all. Its status test names the user's in-flight index and
-- no queued-only one: with statistics taken while few jobs were queued, a plan would otherwise
-- walk every queued job for this user's few (measured: all 1,980 queued jobs, on every enqueue).
WITH quota AS MATERIALIZED (
    SELECT * FROM user_quota_locked($2, $11::int8, $12::int8) WHERE $11::int8 > 0 OR $12::int8 > 0
), allowed AS (
    SELECT ($11 = 0 OR (SELECT recent_jobs FROM quota) < $11)
       AND ($12 = 0 OR (SELECT queued FROM quota) < $12) AS ok
), head AS (
    SELECT fair_key FROM generation_jobs WHERE status = 'queued' ORDER BY fair_key, created_at, id LIMIT 1
), tail AS (
    SELECT fair_key FROM generation_jobs WHERE status = 'queued'
    ORDER BY fair_key DESC, created_at DESC, id DESC LIMIT 1
), user_jobs AS (
    SELECT CASE WHEN EXISTS (SELECT 1 FROM quota) THEN (SELECT last_key FROM quota)
                ELSE (SELECT max(fair_key) FROM generation_jobs
                      WHERE user_id = $2 AND status IN ('queued', 'processing')) END AS last_key
), at_limit AS (
    SELECT user_id FROM slots_held_by_user WHERE held >= $10
), key AS (
    SELECT greatest(
        coalesce((SELECT fair_key FROM head),
                 (SELECT max(fair_key) FROM generation_jobs WHERE status = 'processing'), 0),
        coalesce((SELECT last_key FROM user_jobs) + 1, 0)) AS k
), free AS (
    -- The waiting-job check refers to the slot row so that it runs only when a slot is free: a
    -- long queue of a user at their limit is then never scanned while every slot is busy.
    SELECT slot FROM job_slots
    WHERE slot <= $8 AND (job_id IS NULL OR lease_expires_at <= now())
      AND $2 NOT IN (SELECT user_id FROM at_limit)
      AND NOT EXISTS (SELECT 1 FROM waiting_jobs w
                      WHERE w.user_id NOT IN (SELECT user_id FROM at_limit) AND job_slots.slot IS NOT NULL)
      -- The snapshot's count can miss a slot another statement gave this user since: where
      -- the allowance can bind, it is counted again under the user's lock (V13), and only
      -- once a slot is free. In a CASE, so that no plan calls it otherwise (as a join, even
      -- an anti-join whose filter is false runs the function first).
      AND NOT (CASE WHEN $10::int8 < $8
                    THEN EXISTS (SELECT 1 FROM user_slots_held_locked(ARRAY[$2]::text[], '{}') h
                                 WHERE h.held >= $10 AND job_slots.slot IS NOT NULL)
                    ELSE false END)
    ORDER BY slot
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), job AS (
    INSERT INTO generation_jobs (id, user_id, tenant_id, job_type, entity_id, params, max_attempts, fair_key,
                                 status, attempts, started_at, lease_expires_at)
    SELECT $1, $2, $3, $4, $5, $6, $7, (SELECT k FROM key),
           CASE WHEN start THEN 'processing' ELSE 'queued' END::job_status,
           CASE WHEN start THEN 1 ELSE 0 END,
           CASE WHEN start THEN now() END,
           CASE WHEN start THEN now() + make_interval(secs => $13) END
    -- Not ahead of a due job holding a reservation: that one starts first, on the next claim.
    FROM (SELECT $13::float8 IS NOT NULL AND EXISTS (SELECT 1 FROM free)
                 AND NOT EXISTS (SELECT 1 FROM job_slots r JOIN generation_jobs q ON q.id = r.job_id
                                 WHERE r.job_id IS NOT NULL AND r.lease_expires_at > now()
                                   AND (q.status = 'queued') IS TRUE AND q.run_after <= now())
                 AS start) s
    WHERE (SELECT ok FROM allowed)
    RETURNING *
), reserved AS (
    -- A started job's slot is leased with it; a reservation lapses after $9 seconds.
    UPDATE job_slots s
    SET job_id = job.id, user_id = $2,
        lease_expires_at = coalesce(job.lease_expires_at, now() + make_interval(secs => $9))
    FROM job, free
    WHERE s.slot = free.slot
    RETURNING s.slot
)
-- The job as a claim returns it; its params only when it started (only then are they read).
SELECT j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id,
       CASE WHEN j.started_at IS NOT NULL THEN j.params END AS params,
       j.status, j.progress, j.result_media_id, j.error_message, j.attempts, j.max_attempts,
       j.created_at, j.started_at, j.completed_at,
       EXISTS (SELECT 1 FROM reserved) AS direct,
       -- Only a queued answer has a position: a direct one is spared the count.
       CASE WHEN EXISTS (SELECT 1 FROM reserved) OR NOT EXISTS (SELECT 1 FROM job) THEN 0
            -- A tie goes to the tally: a job at or past the tail has nothing behind it.
            WHEN (SELECT fair_key FROM job) - (SELECT fair_key FROM head)
                 < (SELECT fair_key FROM tail) - (SELECT fair_key FROM job)
            -- Bounded by the line's ends too: the levels claimed since the last vacuum lie
            -- below the head as dead index entries, which a walk from the start would read.
            THEN queue_levels_sum((SELECT fair_key FROM head), (SELECT fair_key FROM job))
            ELSE (SELECT sum(queued) FROM queue_tally)::int8
                 - queue_levels_sum((SELECT fair_key FROM job) + 1, (SELECT fair_key FROM tail))
       END AS queued_ahead,
       coalesce((SELECT recent_jobs FROM quota), 0) AS recent_jobs,
       (SELECT recent_oldest FROM quota) AS recent_oldest
FROM (SELECT 1) one LEFT JOIN job j ON true
