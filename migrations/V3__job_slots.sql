-- Slots: MAX_CONCURRENT_JOBS of these rows are in use. A slot is held by the job named in it
-- until its lease expires; nothing ever counts up or down, so nothing can leak: a crashed
-- worker's slot frees itself when the lease runs out. Claiming takes a free slot row with
-- FOR UPDATE SKIP LOCKED in the same statement that claims the job, so racing claimers (and
-- racing enqueues reserving a slot for a `direct` answer) can never take the same slot.
CREATE TABLE job_slots (
    slot             integer PRIMARY KEY CHECK (slot BETWEEN 1 AND 1000),
    job_id           uuid UNIQUE,
    lease_expires_at timestamptz,
    CONSTRAINT held_slots_have_a_lease CHECK ((job_id IS NULL) = (lease_expires_at IS NULL))
);

INSERT INTO job_slots (slot) SELECT generate_series(1, 1000);
