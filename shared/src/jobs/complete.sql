-- Stores the job's media, completes it and frees its slot in one statement, fenced by the
-- attempt that ran it.
-- The row is locked first so that media are written only if the completion itself will apply.
WITH job AS (
    SELECT id, user_id, tenant_id FROM generation_jobs
    -- IS TRUE: by primary key, never by walking a partial index of processing jobs.
    WHERE id = $1 AND (status = 'processing') IS TRUE AND attempts = $2
    FOR UPDATE
), media AS (
    INSERT INTO generated_media (id, job_id, user_id, tenant_id, ordinal, media_type, mime_type,
                                 storage, storage_key, public_url, width, height, size_bytes)
    SELECT m.id, job.id, job.user_id, job.tenant_id, m.ordinal - 1, m.media_type, m.mime_type,
           m.storage, m.storage_key, m.public_url, m.width, m.height, m.size_bytes
    FROM job,
         unnest($3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::int4[], $10::int4[], $11::int8[])
             WITH ORDINALITY AS m(id, media_type, mime_type, storage, storage_key, public_url,
                                  width, height, size_bytes, ordinal)
    RETURNING id, ordinal
), done AS (
    UPDATE generation_jobs
    SET status = 'completed',
        progress = 100,
        result_media_id = (SELECT id FROM media WHERE ordinal = 0),
        model_used = $12,
        credits_used = $13,
        error_message = NULL,
        lease_expires_at = NULL,
        completed_at = now(),
        updated_at = now()
    WHERE id IN (SELECT id FROM job)
    RETURNING id, user_id, completed_at
), released AS (
    UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL
    WHERE job_id IN (SELECT id FROM done)
    RETURNING slot
), next_waiting AS (
    -- The slot just freed is owed to the next job in line: its message may be deferred for
    -- minutes, so the caller sends it a fresh one rather than leave the slot idle.
    SELECT w.id FROM waiting_jobs w
    WHERE EXISTS (SELECT 1 FROM released) AND w.user_id NOT IN (
          -- Users at their limit, not counting the slot this statement frees.
          SELECT u.user_id FROM slots_held_by_user u
          WHERE u.held - (SELECT count(*) FROM done WHERE done.user_id = u.user_id) >= $14)
      AND w.id NOT IN (SELECT id FROM done)
    ORDER BY w.fair_key, w.created_at, w.id
    LIMIT 1
)
SELECT done.id, (SELECT id FROM next_waiting) AS next_waiting FROM done
