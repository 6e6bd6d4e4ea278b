-- Records progress and renews the lease of the attempt that holds the job. Progress never goes
-- down; a worker whose attempt is no longer current changes nothing.
UPDATE generation_jobs
SET progress = GREATEST(progress, $3),
    lease_expires_at = now() + make_interval(secs => $4),
    updated_at = now()
WHERE id = $1 AND status = 'processing' AND attempts = $2
RETURNING progress
