-- A new connection replaces the old one whole: its folder may belong to another Google account.
INSERT INTO drive_connections (user_id, refresh_token_sealed, access_token_sealed, access_expires_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id) DO UPDATE
SET refresh_token_sealed = EXCLUDED.refresh_token_sealed,
    access_token_sealed = EXCLUDED.access_token_sealed,
    access_expires_at = EXCLUDED.access_expires_at,
    folder_id = NULL,
    connected_at = now(),
    updated_at = now()
RETURNING connected_at
