DELETE FROM drive_connections WHERE user_id = $1
