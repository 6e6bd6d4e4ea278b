-- Inserts a job and, from the same snapshot, reports the load it was admitted into: live leases
-- and queued jobs (all ahead of this one, which is the newest). One statement, one commit.
WITH load AS (
    SELECT count(*) FILTER (WHERE status = 'processing' AND lease_expires_at > now()) AS active,
           count(*) FILTER (WHERE status = 'queued') AS queued_ahead
    FROM generation_jobs
    WHERE status IN ('queued', 'processing')
), job AS (
    INSERT INTO generation_jobs (id, user_id, tenant_id, job_type, entity_id, params, max_attempts)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    RETURNING created_at
)
SELECT job.created_at, load.active, load.queued_ahead FROM job, load
