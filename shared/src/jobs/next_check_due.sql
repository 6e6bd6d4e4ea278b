SELECT min(next_check_at) AS due FROM generation_jobs
WHERE status = 'processing' AND lease_expires_at IS NULL
