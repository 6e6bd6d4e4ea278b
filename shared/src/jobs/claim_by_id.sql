-- Claims one named job for a worker: only a queued job that is due, and only with a slot. The
-- slot is the one reserved for it at enqueue, or a free one if the job is among the first
-- waiting jobs in fair-share order (as many as there are free slots) and its user holds fewer
-- than $4 slots. The job row and the slot row change in one statement, so a duplicate delivery
-- finds nothing to claim and no slot is taken twice; a job that is not next in line waits.
-- `(status = 'queued') IS TRUE` where a job is found by id: the plain form lets the planner
-- serve the lookup from a partial index of queued jobs that happens to hold `id`, and with
-- statistics taken while few jobs were queued it does, scanning that whole index for one id
-- (measured: 3.5 ms at 10,000 queued). This form matches no partial index, so the primary key
-- serves it.
WITH target AS (
    SELECT id, user_id, fair_key, created_at FROM generation_jobs
    WHERE id = $1 AND (status = 'queued') IS TRUE AND run_after <= now()
), at_limit AS (
    SELECT user_id FROM slots_held_by_user WHERE held >= $4
), mine AS (
    SELECT slot FROM job_slots WHERE job_id = $1 AND lease_expires_at > now()
    FOR UPDATE
), lapsed AS (
    -- A reservation of this job that ran out: freed below if the job gets another slot. If
    -- another statement holds that row, the job is not claimed now (see `claimed`): the two
    -- rows naming it would fail the unique job_id, or wait on that statement.
    SELECT slot FROM job_slots WHERE job_id = $1 AND lease_expires_at <= now()
    FOR UPDATE SKIP LOCKED
), lapsed_held_elsewhere AS (
    SELECT 1 FROM job_slots
    WHERE job_id = $1 AND lease_expires_at <= now() AND slot NOT IN (SELECT slot FROM lapsed)
), free_slots AS (
    SELECT count(*) AS n FROM job_slots WHERE slot <= $3 AND (job_id IS NULL OR lease_expires_at <= now())
), ahead AS (
    SELECT count(*) AS n FROM (
        SELECT 1 FROM waiting_jobs w, target t
        WHERE w.user_id NOT IN (SELECT user_id FROM at_limit)
          AND (w.fair_key, w.created_at, w.id) < (t.fair_key, t.created_at, t.id)
        LIMIT (SELECT n FROM free_slots)
    ) x
), next_in_line AS (
    SELECT 1 FROM target t
    WHERE (SELECT n FROM ahead) < (SELECT n FROM free_slots)
      AND t.user_id NOT IN (SELECT user_id FROM at_limit)
      -- The snapshot's count can miss a slot another statement gave this user since: where
      -- the allowance can bind, it is counted again under the user's lock (V13). In a CASE,
      -- so that no plan calls it otherwise.
      AND NOT (CASE WHEN $4::int8 < $3
                    THEN EXISTS (SELECT 1 FROM user_slots_held_locked(ARRAY[t.user_id], '{}') h
                                 WHERE h.held >= $4)
                    ELSE false END)
), free AS (
    SELECT slot FROM job_slots
    WHERE slot <= $3 AND (job_id IS NULL OR lease_expires_at <= now())
      AND NOT EXISTS (SELECT 1 FROM mine) AND EXISTS (SELECT 1 FROM next_in_line)
    -- Its own lapsed reservation first, if free: then no other row names it.
    ORDER BY job_id IS DISTINCT FROM $1, slot
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT slot FROM mine UNION ALL SELECT slot FROM free
), claimed AS (
    UPDATE generation_jobs
    SET status = 'processing',
        attempts = attempts + 1,
        started_at = now(),
        lease_expires_at = now() + make_interval(secs => $2),
        updated_at = now()
    WHERE id IN (SELECT id FROM target) AND (status = 'queued') IS TRUE AND EXISTS (SELECT 1 FROM chosen)
      AND NOT EXISTS (SELECT 1 FROM lapsed_held_elsewhere)
    RETURNING id, user_id, tenant_id, job_type, entity_id, params, status, progress, result_media_id, error_message, attempts, max_attempts, created_at, started_at, completed_at, lease_expires_at
), held AS (
    UPDATE job_slots s
    SET job_id = claimed.id, user_id = claimed.user_id, lease_expires_at = claimed.lease_expires_at
    FROM claimed
    WHERE s.slot = (SELECT slot FROM chosen LIMIT 1)
    RETURNING s.slot
), unreserved AS (
    UPDATE job_slots s
    SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    FROM claimed
    WHERE s.slot IN (SELECT slot FROM lapsed) AND s.job_id = claimed.id
      AND s.slot <> (SELECT slot FROM chosen LIMIT 1)
    RETURNING s.slot
)
SELECT claimed.*, (SELECT slot FROM held) AS slot FROM claimed
