SELECT attempt, retryable, message, created_at FROM job_errors WHERE job_id = $1 ORDER BY attempt
