UPDATE webhook_deliveries SET delivered_at = now(), last_error = NULL
WHERE event_id = $1 AND delivered_at IS NULL AND given_up_at IS NULL
