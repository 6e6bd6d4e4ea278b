-- Wait estimates read the latest run times of one job type.
CREATE INDEX idx_jobs_completed_by_type ON generation_jobs (job_type, completed_at DESC) WHERE status = 'completed';

-- Idempotency-Key: one row per (user, tenant, key) for 24 hours. The request is kept as the
-- canonical job it asked for, so a repeat is compared by meaning, not by bytes.
CREATE TABLE idempotency_keys (
    user_id     text NOT NULL,
    tenant_id   text NOT NULL DEFAULT '',
    key         text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request     jsonb NOT NULL,
    job_id      uuid NOT NULL REFERENCES generation_jobs (id) ON DELETE CASCADE,
    response    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, tenant_id, key)
);
CREATE INDEX idx_idempotency_keys_created ON idempotency_keys (created_at);
