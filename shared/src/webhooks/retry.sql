-- A failed attempt: try again after $3 seconds, or give up when $4 attempts are spent.
UPDATE webhook_deliveries
SET last_error = $2,
    next_attempt_at = now() + make_interval(secs => $3),
    given_up_at = CASE WHEN attempts >= $4 THEN now() END
WHERE event_id = $1 AND delivered_at IS NULL AND given_up_at IS NULL
