-- Records the answer given under an Idempotency-Key. A key still inside its 24 hours is kept
-- as it is (no row returned: the caller rolls back and replays it); an older one is replaced.
-- A concurrent request with the same key waits here until the first one commits or rolls back.
INSERT INTO idempotency_keys (user_id, tenant_id, key, request, job_id, response)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (user_id, tenant_id, key) DO UPDATE
SET request = EXCLUDED.request, job_id = EXCLUDED.job_id, response = EXCLUDED.response, created_at = now()
WHERE idempotency_keys.created_at < now() - interval '24 hours'
RETURNING job_id
