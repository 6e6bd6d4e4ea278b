-- The provider is still working: keep the progress shown so far (it never goes down), take its
-- new estimate, and set when to ask again. The check ends, and frees the job for the next.
UPDATE generation_jobs
SET progress = GREATEST(progress, $3),
    provider_expected_at = COALESCE(now() + make_interval(secs => $4), provider_expected_at),
    -- Output already found ready may still be collected past the deadline (for a grace the
    -- next check judges).
    next_check_at = CASE WHEN provider_outputs IS NULL
                         THEN LEAST(now() + make_interval(secs => $5), provider_deadline)
                         ELSE now() + make_interval(secs => $5) END,
    check_taken_until = NULL,
    updated_at = now()
-- IS TRUE: by primary key, never by walking a partial index of processing jobs.
WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2 AND lease_expires_at IS NULL
RETURNING progress
