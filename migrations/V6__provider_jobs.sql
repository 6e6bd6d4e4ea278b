-- Long provider jobs and per-user media stores.
--
-- A job the provider accepted but has not finished stays 'processing' with the provider's id.
-- It holds no worker and so no lease: the poller (and, rate-limited, the status route) checks it
-- at next_check_at, and fails it once provider_deadline passes.
ALTER TABLE generation_jobs
    ADD COLUMN submitted_at         timestamptz,
    -- When the provider expects to finish, from its latest eta; drives the progress estimate.
    ADD COLUMN provider_expected_at timestamptz,
    ADD COLUMN provider_deadline    timestamptz,
    ADD COLUMN next_check_at        timestamptz,
    -- The last time anyone asked the provider; limits how often the status route may.
    ADD COLUMN checked_at           timestamptz;

ALTER TABLE generation_jobs DROP CONSTRAINT processing_is_leased;
ALTER TABLE generation_jobs ADD CONSTRAINT processing_is_leased_or_awaiting CHECK (
    status <> 'processing'
    OR (started_at IS NOT NULL AND completed_at IS NULL AND attempts >= 1
        AND (lease_expires_at IS NOT NULL
             OR (external_job_id IS NOT NULL AND submitted_at IS NOT NULL
                 AND next_check_at IS NOT NULL AND provider_deadline IS NOT NULL))));

-- Only jobs waiting on the provider are ever due for a check.
CREATE INDEX idx_jobs_provider_due ON generation_jobs (next_check_at)
    WHERE status = 'processing' AND lease_expires_at IS NULL;

-- A user's Google Drive connection. Tokens are sealed (AES-256-GCM, key from configuration,
-- the user id as associated data), so a database dump alone reveals none of them.
CREATE TABLE drive_connections (
    user_id              text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 255),
    refresh_token_sealed bytea NOT NULL,
    access_token_sealed  bytea,
    access_expires_at    timestamptz,
    folder_id            text,
    connected_at         timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT access_token_has_expiry CHECK ((access_token_sealed IS NULL) = (access_expires_at IS NULL))
);
