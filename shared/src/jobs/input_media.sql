-- The owner's own media, by id: a job may only use its user's images as input.
SELECT id, storage, storage_key, public_url FROM generated_media
WHERE id = ANY($1) AND user_id = $2
