-- Follows completions.sql: hands the completed jobs' slots to the next jobs in line, in the
-- same statement and so the same commit (the embedded queue's completer round: one round trip
-- and one commit for a batch of completions and the claims they free slots for). Without
-- completions it is the embedded claimer's claim of up to $17 jobs.
-- It claims, as slots allow, one job for each completed job whose worker takes another ($16,
-- beside $1), plus $17: every due job holding a reservation, plus the next waiting jobs in
-- fair-share order paired with as many free slots (within the first $19), each user getting no
-- more than its $20-slot allowance. $18 is the lease in seconds.
-- The completed jobs' slots go straight to the next jobs, one write each instead of a release
-- and a take, and whatever is not given away is freed here. Their jobs count against no user's
-- allowance, except a slot another statement holds locked: neither handed on nor freed here, it
-- still counts, and is returned as `stranded` for the caller to free after the commit. Every row it will change is locked up front with SKIP LOCKED, so a claim never
-- waits for a row another statement holds: a job or slot someone else holds is simply left for
-- the next claim. (The exception: the completions, locked in id order as completions.sql says,
-- before anything else.) Where an allowance can bind it waits for its users' locks
-- (`held_by_user`), which it takes after the completions' rows, and after it has a free slot;
-- holding them, it waits for no job or slot row, and nor does any other statement that takes
-- them.
-- Every CTE reads the one snapshot taken before the completions: the completed jobs are still
-- `processing` there and their slots still name them, which is what the claim below expects of
-- slots it is handed. What another statement commits after that snapshot is caught where it
-- matters: a job or slot it took fails the re-check of the row lock, and a user's held slots
-- are counted in a later snapshot, under that user's lock (`held_by_user`).
-- `(status = 'queued') IS TRUE` where a job is found by id: the plain form lets the planner
-- serve the lookup from a partial index of queued jobs that happens to hold `id`, and with
-- statistics taken while few jobs were queued it does, scanning that whole index for one id
-- (measured: 3.5 ms at 10,000 queued). This form matches no partial index, so the primary key
-- serves it.
, handed_jobs AS (
    SELECT coalesce(array_agg(id), '{}') AS ids FROM done
), wanted AS (
    SELECT count(*) + $17 AS n
    FROM done JOIN unnest($1::uuid[], $16::bool[]) AS t(id, takes) USING (id)
    WHERE t.takes
), handed_all AS (
    -- The completed jobs' slots, read only when there are any, and locked without waiting:
    -- waiting could close a cycle through a user's lock (`held_by_user`). Another statement may
    -- hold one: a claimer giving a slot whose lease ran out to another job, or any statement
    -- that locked the slot to take it and found, on the re-check, that it was taken (the lock
    -- stays until that statement commits). Such a slot is not handed on, still counts for its
    -- user, and is returned as `stranded` for the caller to free once this commits.
    SELECT slot, job_id, user_id FROM job_slots
    WHERE cardinality((SELECT ids FROM handed_jobs)) > 0 AND job_id = ANY ((SELECT ids FROM handed_jobs)::uuid[])
    FOR UPDATE SKIP LOCKED
), handed AS (
    SELECT slot FROM handed_all WHERE slot <= $19
), open AS (
    -- In slot order, so the primary key is walked only as far as `wanted` free slots.
    SELECT slot FROM job_slots
    WHERE slot <= $19 AND (job_id IS NULL OR lease_expires_at <= now())
      AND (job_id IS NULL OR job_id <> ALL ((SELECT ids FROM handed_jobs)::uuid[]))
    ORDER BY slot LIMIT (SELECT n FROM wanted)
    FOR UPDATE SKIP LOCKED
), free AS (
    -- The handed slots first, so that as few as possible are written twice.
    SELECT slot, row_number() OVER (ORDER BY first, slot) AS rn
    FROM (SELECT slot, 0 AS first FROM handed UNION ALL SELECT slot, 1 FROM open) f
), reserved AS (
    -- The held slots' jobs that are still queued are looked up first, by key and unlocked, and
    -- only those are joined and locked: while the line drains, every held slot's job is
    -- running, and joining them all cost a lookup of every held job per held slot (measured:
    -- 400 for 20 slots, a tenth of a 20-job round).
    SELECT s.slot, s.job_id AS id
    FROM job_slots s JOIN generation_jobs q ON q.id = s.job_id
    WHERE s.job_id = ANY (ARRAY(
              SELECT r.id FROM generation_jobs r
              WHERE r.id = ANY (ARRAY(SELECT job_id FROM job_slots WHERE job_id IS NOT NULL AND lease_expires_at > now()))
                AND (r.status = 'queued') IS TRUE AND r.run_after <= now()))
      AND s.lease_expires_at > now() AND (q.status = 'queued') IS TRUE AND q.run_after <= now()
    LIMIT (SELECT n FROM wanted)
    FOR UPDATE OF s, q SKIP LOCKED
), full_users AS (
    -- Where an allowance can bind: the users at it in this snapshot, not counting the slots
    -- this round hands on. None of their jobs can start now, so the look at the line passes
    -- over them however many they have waiting (a look that counted them could find nothing
    -- else and leave a slot idle). Only where to look: each user's count is confirmed under
    -- their lock (`held_by_user`).
    SELECT u.user_id FROM slots_held_by_user u
    WHERE $20::int8 < $19
      AND u.held - (SELECT count(*) FROM handed_all h WHERE h.user_id = u.user_id) >= $20
), head AS (
    -- A bounded look at the front of the line, ranked within each user. Not locked here: see
    -- `taken`. Where an allowance can hold users back ($20 < $19) it looks four times as far
    -- as it wants jobs, past the users at it; otherwise every job in it can be taken, bar the
    -- few another claimer holds or has claimed since the snapshot (or whose lapsed reservation
    -- another statement holds), and a margin is enough (each job looked at is a lookup by key).
    SELECT w.id, w.user_id, w.fair_key, w.created_at,
           row_number() OVER (PARTITION BY w.user_id ORDER BY w.fair_key, w.created_at, w.id) AS turn
    FROM (SELECT q.id, q.user_id, q.fair_key, q.created_at FROM generation_jobs q
          -- An array, not IN (subquery): the planner then fetches these few rows by primary key
          -- even in a generic plan, which cannot know the LIMIT and would scan the table.
          WHERE q.id = ANY (ARRAY(SELECT id FROM waiting_jobs
                                  WHERE $20::int8 >= $19 OR user_id <> ALL (ARRAY(SELECT user_id FROM full_users))
                                  ORDER BY fair_key, created_at, id
                                  LIMIT CASE WHEN $20::int8 < $19 THEN 4 ELSE 1 END * (SELECT n FROM wanted) + 16))
            AND (q.status = 'queued') IS TRUE) w
), held_by_user AS (
    -- The slots the users in that look already hold, not counting the ones handed on here:
    -- counted after taking their locks, in a snapshot of their own (user_slots_held_locked), so
    -- that no other statement gives them a slot unseen. Only where the allowance can bind: with
    -- an allowance of all the slots, the slots themselves are the limit, and without a job
    -- wanted and a free slot nothing can be claimed: then no user is named, and nothing is
    -- locked or counted.
    SELECT h.user_id, h.held
    FROM user_slots_held_locked(CASE WHEN $20::int8 < $19 AND (SELECT n FROM wanted) > 0
                                          AND EXISTS (SELECT 1 FROM free)
                                     THEN ARRAY(SELECT DISTINCT user_id FROM head) ELSE '{}' END,
                                ARRAY(SELECT job_id FROM handed_all)) h
), next AS (
    SELECT h.id FROM head h LEFT JOIN held_by_user u ON u.user_id = h.user_id
    WHERE h.turn <= $20 - coalesce(u.held, 0)
), taken_rows AS (
    -- The jobs within their users' allowance are locked in line order until there are `wanted`: one
    -- that another claimer holds is skipped for the next, and the rest of the lookahead is never
    -- locked (each row lock is a WAL record; locking it all took 92 locks to claim 19 jobs). A
    -- job claimed and committed since this statement's snapshot fails the re-checked status.
    SELECT q.id, q.fair_key, q.created_at FROM generation_jobs q
    WHERE q.id = ANY (ARRAY(SELECT id FROM next)) AND (q.status = 'queued') IS TRUE
    ORDER BY q.fair_key, q.created_at, q.id
    LIMIT (SELECT n FROM wanted)
    FOR UPDATE SKIP LOCKED
), lapsed AS (
    -- Reservations that ran out still name some of these jobs: a job claimed with another slot
    -- has that row freed below. A job whose old row another statement holds is not claimed
    -- now: the two rows naming it would fail the unique job_id, or wait on that statement.
    SELECT slot, job_id FROM job_slots
    WHERE job_id = ANY (ARRAY(SELECT id FROM taken_rows)) AND lease_expires_at <= now()
    FOR UPDATE SKIP LOCKED
), taken AS (
    SELECT t.id, row_number() OVER (ORDER BY t.fair_key, t.created_at, t.id) AS rn
    FROM taken_rows t
    WHERE NOT EXISTS (SELECT 1 FROM job_slots x
                      WHERE x.job_id = t.id AND x.lease_expires_at <= now()
                        AND x.slot NOT IN (SELECT slot FROM lapsed))
), pairs AS (
    -- Reserved jobs first, then the line; never more than wanted in all.
    SELECT id, slot FROM (
        SELECT id, slot, 0 AS reserved_first, 0::bigint AS rn FROM reserved
        UNION ALL
        SELECT taken.id, free.slot, 1, taken.rn FROM taken JOIN free USING (rn)
    ) p
    ORDER BY reserved_first, rn
    LIMIT (SELECT n FROM wanted)
), claimed AS (
    UPDATE generation_jobs j
    SET status = 'processing',
        attempts = j.attempts + 1,
        started_at = now(),
        lease_expires_at = now() + make_interval(secs => $18),
        updated_at = now()
    FROM pairs
    -- The array lets even a plan made while the table was nearly empty (a fresh database)
    -- fetch these few rows by primary key instead of scanning the queue.
    WHERE j.id = ANY (ARRAY(SELECT id FROM pairs)) AND j.id = pairs.id AND (j.status = 'queued') IS TRUE
    RETURNING j.id, j.user_id, j.tenant_id, j.job_type, j.entity_id, j.params, j.status, j.progress, j.result_media_id, j.error_message, j.attempts, j.max_attempts, j.created_at, j.started_at, j.completed_at, j.lease_expires_at, pairs.slot
), held AS (
    UPDATE job_slots s
    SET job_id = claimed.id, user_id = claimed.user_id, lease_expires_at = claimed.lease_expires_at
    FROM claimed
    WHERE s.slot = claimed.slot
    RETURNING s.slot
), unreserved AS (
    -- Not a slot just given to a job: one statement must not change a row twice.
    UPDATE job_slots s
    SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    FROM lapsed JOIN claimed ON claimed.id = lapsed.job_id
    WHERE s.slot = lapsed.slot AND s.job_id = lapsed.job_id
      AND s.slot NOT IN (SELECT slot FROM claimed)
    RETURNING s.slot
), unhanded AS (
    -- The completed jobs' slots (those locked above) no claimed job took.
    UPDATE job_slots s
    SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    WHERE s.slot IN (SELECT slot FROM handed_all) AND s.job_id = ANY ((SELECT ids FROM handed_jobs)::uuid[])
      AND s.slot NOT IN (SELECT slot FROM claimed)
    RETURNING s.slot
), left_waiting AS (
    -- Whether a due job is still waiting once these are claimed (for a slot, or for its user's
    -- allowance), reserved or not, locked by someone else or not. While none is and no job has
    -- come since, the embedded queue's completer writes completions alone instead of asking
    -- for a claim that would find nothing.
    -- At most n of the first n + 1 in line were claimed. Taken in line order, as in `head`,
    -- so that even a generic plan walks the index of the line rather than the table.
    SELECT EXISTS (SELECT 1 FROM unnest(ARRAY(SELECT id FROM waiting_jobs
                                              ORDER BY fair_key, created_at, id LIMIT (SELECT n FROM wanted) + 1)) w (id)
                   WHERE w.id <> ALL (ARRAY(SELECT id FROM claimed)))
        OR EXISTS (SELECT 1 FROM job_slots s JOIN generation_jobs q ON q.id = s.job_id
                   WHERE s.job_id IS NOT NULL AND s.lease_expires_at > now()
                     AND (q.status = 'queued') IS TRUE AND q.run_after <= now()
                     AND q.id <> ALL (ARRAY(SELECT id FROM claimed))) AS more
)
-- One row even when nothing was claimed, to carry the flags. `stranded`: the completed jobs
-- whose slots another statement held (see `handed_all`), looked up only when one was skipped.
SELECT c.*, l.more AS left_waiting, (SELECT ids FROM handed_jobs) AS applied,
       CASE WHEN (SELECT count(*) FROM handed_all) < cardinality((SELECT ids FROM handed_jobs))
            THEN ARRAY(SELECT s.job_id FROM job_slots s
                       WHERE s.job_id = ANY ((SELECT ids FROM handed_jobs)::uuid[])
                         AND s.slot NOT IN (SELECT slot FROM handed_all))
            ELSE '{}'::uuid[] END AS stranded
FROM left_waiting l LEFT JOIN claimed c ON true
