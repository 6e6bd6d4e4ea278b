UPDATE drive_connections SET folder_id = $3, updated_at = now()
WHERE user_id = $1 AND refresh_token_sealed = $2
