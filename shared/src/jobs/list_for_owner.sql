-- The owner's jobs, newest first: after the keyset cursor ($5, $6) when one is given, of one
-- status ($3) and one type ($4) when asked. Served by idx_jobs_user (user_id, created_at DESC).
SELECT j.id, j.job_type, j.status, j.progress, j.error_message, j.attempts,
       j.created_at, j.started_at, j.completed_at,
       m.id AS media_id, m.media_type, m.mime_type, m.public_url, m.width, m.height,
       m.size_bytes, m.created_at AS media_created_at
FROM generation_jobs j
LEFT JOIN generated_media m ON m.id = j.result_media_id
WHERE j.user_id = $1 AND j.tenant_id IS NOT DISTINCT FROM $2
  AND ($3::job_status IS NULL OR j.status = $3)
  AND ($4::text IS NULL OR j.job_type = $4)
  AND ($5::timestamptz IS NULL OR (j.created_at, j.id) < ($5, $6::uuid))
ORDER BY j.created_at DESC, j.id DESC
LIMIT $7
