SELECT id, media_type, mime_type, public_url, width, height, size_bytes, created_at
FROM generated_media
WHERE job_id = $1
ORDER BY ordinal
