-- Completion webhooks to clients. Every terminal transition of a job created with a webhookUrl
-- records one event here, in the same transaction as the transition (an outbox): an event is
-- never lost, never made twice, and its id lets the receiver drop repeats.
CREATE TABLE webhook_deliveries (
    event_id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          uuid NOT NULL REFERENCES generation_jobs (id) ON DELETE CASCADE,
    status          job_status NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    url             text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    given_up_at     timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT settled_once CHECK (delivered_at IS NULL OR given_up_at IS NULL)
);

CREATE INDEX idx_webhook_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
CREATE INDEX idx_webhook_job ON webhook_deliveries (job_id);

CREATE FUNCTION record_completion_webhook() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, status, url)
    VALUES (NEW.id, NEW.status, NEW.params ->> 'webhookUrl');
    RETURN NULL;
END;
$$;

-- The WHEN clause keeps jobs without a webhook free of any extra work.
CREATE TRIGGER job_reached_terminal_state
    AFTER UPDATE OF status ON generation_jobs
    FOR EACH ROW
    WHEN (NEW.status IN ('completed', 'failed', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.params ? 'webhookUrl')
    EXECUTE FUNCTION record_completion_webhook();
