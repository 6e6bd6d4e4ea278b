-- One page of processing jobs whose lease ran out before $1, oldest lease first, after the
-- keyset cursor ($2, $3) when there is one.
SELECT id, attempts, max_attempts, lease_expires_at
FROM generation_jobs
WHERE status = 'processing'
  AND lease_expires_at < $1
  AND ($2::timestamptz IS NULL OR (lease_expires_at, id) > ($2, $3::uuid))
ORDER BY lease_expires_at, id
LIMIT $4
