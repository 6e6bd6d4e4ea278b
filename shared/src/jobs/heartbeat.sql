-- Records progress and renews the lease of the attempt that holds the job, and of its slot.
-- Progress never goes down. An attempt that is no longer current, or whose expired slot was
-- taken by another job, changes nothing and learns it must stop.
-- The slot is locked first: a claim giving this job's expired slot to another job holds that
-- row until it commits, and the renewal then waits for it and sees who holds the slot. (Read
-- unlocked, the slot still named this job in the snapshot, the job's lease was renewed, and the
-- worker carried on beside the slot's new job.) Only for the current attempt: an earlier one's
-- heartbeat locks nothing. A deadlock with a statement that locks the job first (a completion,
-- the rescuer) is retried by each caller.
WITH held AS (
    SELECT slot FROM job_slots
    WHERE job_id = $1
      AND EXISTS (SELECT 1 FROM generation_jobs
                  WHERE id = $1 AND attempts = $2 AND (status = 'processing') IS TRUE)
    FOR UPDATE
), job AS (
    UPDATE generation_jobs
    SET progress = GREATEST(progress, $3),
        lease_expires_at = now() + make_interval(secs => $4),
        updated_at = now()
    -- IS TRUE: by primary key, never by walking a partial index of processing jobs.
    WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2
      AND EXISTS (SELECT 1 FROM held)
    RETURNING id, progress, lease_expires_at
), slot AS (
    UPDATE job_slots s SET lease_expires_at = job.lease_expires_at
    FROM job, held WHERE s.slot = held.slot
    RETURNING s.slot
)
SELECT progress FROM job
