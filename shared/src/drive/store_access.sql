-- Keeps a refreshed access token, unless the connection was replaced or removed meanwhile.
UPDATE drive_connections
SET access_token_sealed = $3, access_expires_at = $4, updated_at = now()
WHERE user_id = $1 AND refresh_token_sealed = $2
