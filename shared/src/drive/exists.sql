SELECT EXISTS (SELECT 1 FROM drive_connections WHERE user_id = $1)
