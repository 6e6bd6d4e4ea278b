-- Postgres is the record of every job; the queue only delivers. Every state change is a guarded
-- UPDATE, and these constraints make an impossible combination of state and timestamps unstorable.

CREATE TYPE job_status AS ENUM ('queued', 'processing', 'completed', 'failed', 'cancelled');

CREATE TABLE generation_jobs (
    id               uuid PRIMARY KEY,
    -- User and tenant ids are the caller's identity (JWT `sub` and `tenant_id`); `sub` is an
    -- opaque string, not always a UUID, and the tables it names belong to another service.
    user_id          text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 255),
    tenant_id        text CHECK (length(tenant_id) BETWEEN 1 AND 255),
    job_type         text NOT NULL CHECK (job_type IN ('character-image', 'moodboard', 'animation')),
    entity_id        uuid NOT NULL,
    params           jsonb NOT NULL DEFAULT '{}'::jsonb,
    status           job_status NOT NULL DEFAULT 'queued',
    progress         smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    result_media_id  uuid,
    error_message    text,
    external_job_id  text,
    model_used       text,
    credits_used     integer NOT NULL DEFAULT 0 CHECK (credits_used >= 0),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    -- When the job reached its terminal state, whichever it is.
    completed_at     timestamptz,

    CONSTRAINT queued_has_no_lease_or_end CHECK (
        status <> 'queued' OR (lease_expires_at IS NULL AND completed_at IS NULL)),
    CONSTRAINT processing_is_leased CHECK (
        status <> 'processing'
        OR (started_at IS NOT NULL AND lease_expires_at IS NOT NULL AND completed_at IS NULL AND attempts >= 1)),
    CONSTRAINT completed_has_result CHECK (
        status <> 'completed'
        OR (started_at IS NOT NULL AND completed_at IS NOT NULL AND result_media_id IS NOT NULL
            AND progress = 100 AND lease_expires_at IS NULL)),
    CONSTRAINT failed_has_error CHECK (
        status <> 'failed' OR (completed_at IS NOT NULL AND error_message IS NOT NULL AND lease_expires_at IS NULL)),
    CONSTRAINT cancelled_is_ended CHECK (
        status <> 'cancelled' OR (completed_at IS NOT NULL AND lease_expires_at IS NULL)),
    CONSTRAINT times_in_order CHECK (
        (started_at IS NULL OR started_at >= created_at)
        AND (completed_at IS NULL OR completed_at >= created_at))
);

CREATE TABLE generated_media (
    id           uuid PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES generation_jobs (id) ON DELETE CASCADE,
    user_id      text NOT NULL,
    tenant_id    text,
    -- Position of this item within its job's output (a moodboard has several).
    ordinal      smallint NOT NULL CHECK (ordinal >= 0),
    media_type   text NOT NULL CHECK (media_type IN ('image', 'video')),
    mime_type    text NOT NULL,
    storage      text NOT NULL CHECK (storage IN ('local', 'google-drive')),
    storage_key  text NOT NULL,
    public_url   text NOT NULL,
    width        integer,
    height       integer,
    size_bytes   bigint NOT NULL CHECK (size_bytes >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, ordinal)
);

ALTER TABLE generation_jobs
    ADD CONSTRAINT generation_jobs_result_media_fk
    FOREIGN KEY (result_media_id) REFERENCES generated_media (id);

-- The seed's indexes, the user one widened to serve "my jobs, newest first".
CREATE INDEX idx_jobs_user ON generation_jobs (user_id, created_at DESC);
CREATE INDEX idx_jobs_status ON generation_jobs (status);
-- FIFO claim order and queue positions look only at queued rows.
CREATE INDEX idx_jobs_queued_fifo ON generation_jobs (created_at, id) WHERE status = 'queued';
-- Live slots and the rescuer look only at leased rows.
CREATE INDEX idx_jobs_processing_lease ON generation_jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX idx_media_job ON generated_media (job_id);
