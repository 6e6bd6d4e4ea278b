-- A check found the job finished and hands it to a worker: the output's URLs are kept, the
-- check lets go of the job (any worker message may take it from here), and it falls due again
-- after $4 seconds, when, if no worker has collected it by then, the poller sends another.
UPDATE generation_jobs
SET provider_outputs = $3, check_taken_until = NULL,
    next_check_at = now() + make_interval(secs => $4), updated_at = now()
-- IS TRUE: by primary key, never by walking a partial index of processing jobs.
WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2 AND lease_expires_at IS NULL
RETURNING id
