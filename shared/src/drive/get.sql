SELECT refresh_token_sealed, access_token_sealed, access_expires_at, folder_id, connected_at
FROM drive_connections WHERE user_id = $1
