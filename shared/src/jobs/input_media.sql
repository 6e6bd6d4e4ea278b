-- The owner's own media, by id: a job may only use its user's images as input, and only its
-- user's in its own tenant (the same user id in another tenant is another principal).
SELECT id, storage, storage_key, public_url FROM generated_media
WHERE id = ANY($1) AND user_id = $2 AND tenant_id IS NOT DISTINCT FROM $3
