-- Records progress and renews the lease of the attempt that holds the job, and of its slot.
-- Progress never goes down. An attempt that is no longer current, or whose expired slot was
-- taken by another job, changes nothing and learns it must stop.
WITH job AS (
    UPDATE generation_jobs
    SET progress = GREATEST(progress, $3),
        lease_expires_at = now() + make_interval(secs => $4),
        updated_at = now()
    -- IS TRUE: by primary key, never by walking a partial index of processing jobs.
    WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2
      AND EXISTS (SELECT 1 FROM job_slots WHERE job_id = $1)
    RETURNING id, progress, lease_expires_at
), slot AS (
    UPDATE job_slots s SET lease_expires_at = job.lease_expires_at
    FROM job WHERE s.job_id = job.id
    RETURNING s.slot
)
SELECT progress FROM job
