-- Retries, rescue and the outbox.

-- A queued job is not claimed before run_after: retry backoff and rescue backoff live here, so
-- the embedded queue honours them too and not only SQS message delays.
ALTER TABLE generation_jobs ADD COLUMN run_after timestamptz NOT NULL DEFAULT now();
-- When the poller last re-sent this job's message (the outbox). NULL: only enqueue sent it.
ALTER TABLE generation_jobs ADD COLUMN dispatched_at timestamptz;

-- Every attempt's error, not only the last one.
CREATE TABLE job_errors (
    job_id      uuid NOT NULL REFERENCES generation_jobs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    retryable   boolean NOT NULL,
    message     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt)
);
