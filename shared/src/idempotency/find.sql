SELECT request, response FROM idempotency_keys
WHERE user_id = $1 AND tenant_id = $2 AND key = $3 AND created_at >= now() - interval '24 hours'
