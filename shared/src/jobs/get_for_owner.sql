-- One job as its owner sees it. Another user's job is indistinguishable from a missing one.
-- A queued job's position counts the queued jobs that will be claimed before it (in fair-share
-- order), plus one: on the shorter side of the job, judged by its key's distance from the
-- line's two ends, either the jobs ahead or all queued jobs (queue_tally) less those behind,
-- each side summed from the per-level counts (queue_levels, V20) but for the job's own level,
-- whose jobs on that side are counted;
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
            THEN queue_levels_sum((SELECT head FROM ends), j.fair_key - 1)
                 + (SELECT count(*) + 1 FROM generation_jobs q
                    WHERE q.status = 'queued' AND q.fair_key = j.fair_key
                      AND (q.created_at, q.id) < (j.created_at, j.id))
            ELSE (SELECT sum(queued) FROM queue_tally)::int8
                 - queue_levels_sum(j.fair_key + 1, (SELECT tail FROM ends))
                 - (SELECT count(*) FROM generation_jobs q
                    WHERE q.status = 'queued' AND q.fair_key = j.fair_key
                      AND (q.created_at, q.id) > (j.created_at, j.id))
       END AS position,
       CASE WHEN j.status = 'queued' THEN (
           SELECT avg(extract(epoch FROM r.completed_at - r.started_at))::float8
           FROM (SELECT completed_at, started_at FROM generation_jobs
                 WHERE job_type = j.job_type AND status = 'completed'
                 ORDER BY completed_at DESC LIMIT 50) r
       ) END AS recent_run_seconds
FROM generation_jobs j
WHERE j.id = $1 AND j.user_id = $2 AND j.tenant_id IS NOT DISTINCT FROM $3
