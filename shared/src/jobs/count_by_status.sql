SELECT status, count(*) AS jobs FROM generation_jobs GROUP BY status
