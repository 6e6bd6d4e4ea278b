-- The outbox: queued jobs that have been claimable for longer than the grace period ($1 seconds)
-- without being claimed, and were not re-sent within it either. Their message failed to send or
-- was lost. Marking them here makes concurrent pollers take different jobs and spaces re-sends.
-- In line order, which the line's index serves: the jobs that start first are re-sent first.
WITH due AS (
    SELECT id FROM generation_jobs
    WHERE status = 'queued'
      AND greatest(run_after, coalesce(dispatched_at, created_at)) < now() - make_interval(secs => $1)
    ORDER BY fair_key, created_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE generation_jobs j
SET dispatched_at = now()
FROM due
WHERE j.id = due.id
RETURNING j.id
