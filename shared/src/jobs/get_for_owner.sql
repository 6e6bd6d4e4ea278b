-- One job as its owner sees it. Another user's job is indistinguishable from a missing one.
-- A queued job's position counts the queued jobs that will be claimed before it (in fair-share
-- order), plus one: the levels before its own, summed from the per-level counts (queue_levels,
-- V20) on the shorter side of the job, judged by its key's distance from the line's two ends
-- (the levels ahead, or all queued jobs (queue_tally) less its own level and those behind),
-- and the jobs of its own level ahead of it (level_ahead).
-- recent_run_seconds is the mean run time of the last 50 completed jobs of its type.
WITH ends AS (
    SELECT (SELECT fair_key FROM generation_jobs WHERE status = 'queued'
            ORDER BY fair_key, created_at, id LIMIT 1) AS head,
           (SELECT fair_key FROM generation_jobs WHERE status = 'queued'
            ORDER BY fair_key DESC, created_at DESC, id DESC LIMIT 1) AS tail
)
SELECT id, user_id, tenant_id, job_type, entity_id, params, status, progress, result_media_id, error_message, attempts, max_attempts, created_at, started_at, completed_at,
       (status = 'processing' AND lease_expires_at IS NULL) AS awaiting_provider, submitted_at, provider_expected_at, checked_at,
       CASE WHEN j.status <> 'queued' THEN NULL
            WHEN j.fair_key - (SELECT head FROM ends) < (SELECT tail FROM ends) - j.fair_key
            -- Bounded by the line's ends too: claimed levels linger as dead index entries.
            THEN queue_levels_sum((SELECT head FROM ends), j.fair_key - 1) + l.level_ahead + 1
            ELSE (SELECT sum(queued) FROM queue_tally)::int8
                 - queue_levels_sum(j.fair_key, (SELECT tail FROM ends)) + l.level_ahead + 1
       END AS position,
       CASE WHEN j.status = 'queued' THEN (
           SELECT avg(extract(epoch FROM r.completed_at - r.started_at))::float8
           FROM (SELECT completed_at, started_at FROM generation_jobs
                 WHERE job_type = j.job_type AND status = 'completed'
                 ORDER BY completed_at DESC LIMIT 50) r
       ) END AS recent_run_seconds
FROM generation_jobs j
-- Its own level's jobs ahead of it, counted on the side of the level it is nearer by arrival
-- (a level holds a job of each user with jobs that deep, in arrival order): a newcomer's job,
-- which joins the level at the line's head last, counts the few behind it, not all ahead.
LEFT JOIN LATERAL (
    SELECT CASE WHEN j.created_at - (SELECT min(created_at) FROM generation_jobs
                                     WHERE status = 'queued' AND fair_key = j.fair_key)
                     <= (SELECT max(created_at) FROM generation_jobs
                         WHERE status = 'queued' AND fair_key = j.fair_key) - j.created_at
                THEN (SELECT count(*) FROM generation_jobs q
                      WHERE q.status = 'queued' AND q.fair_key = j.fair_key
                        AND (q.created_at, q.id) < (j.created_at, j.id))
                ELSE queue_levels_sum(j.fair_key, j.fair_key) - 1
                     - (SELECT count(*) FROM generation_jobs q
                        WHERE q.status = 'queued' AND q.fair_key = j.fair_key
                          AND (q.created_at, q.id) > (j.created_at, j.id)) END AS level_ahead
    WHERE j.status = 'queued'
) l ON true
WHERE j.id = $1 AND j.user_id = $2 AND j.tenant_id IS NOT DISTINCT FROM $3
