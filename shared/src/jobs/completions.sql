-- The completions a batch statement writes, in one statement and one commit: every job that
-- finished while the previous batch was being written. Each job is fenced by its own attempt
-- exactly as in complete.sql, and its media are written only if its completion applies; a job
-- whose attempt is no longer current is left as it is. `done` names the jobs whose completion
-- applied. Their slots are left to what follows: complete_batch.sql frees them, and
-- claim_batch.sql hands them straight to the next jobs in line (or names those it could not
-- lock, for its caller to free).
-- $1 job ids, $2 their attempts, $3 credits; $4..$14 their media, as columns; $15 the model.
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::int4[], $3::int4[]) AS i(id, attempt, credits)
), job AS (
    -- Locked in id order, so two batches (or a batch and a single transition) never deadlock.
    SELECT j.id, j.user_id, j.tenant_id, input.credits
    FROM generation_jobs j JOIN input ON input.id = j.id AND input.attempt = j.attempts
    -- By primary key, whatever the plan thinks the table's size is; the IS TRUE form matches no
    -- partial index, which a generic plan would otherwise walk whole (measured: 24 pages of
    -- the processing-lease index, dead entries included, for 5 jobs).
    WHERE j.id = ANY ($1) AND (j.status = 'processing') IS TRUE
    ORDER BY j.id
    FOR UPDATE OF j
), media AS (
    INSERT INTO generated_media (id, job_id, user_id, tenant_id, ordinal, media_type, mime_type,
                                 storage, storage_key, public_url, width, height, size_bytes)
    SELECT m.id, job.id, job.user_id, job.tenant_id, m.ordinal, m.media_type, m.mime_type,
           m.storage, m.storage_key, m.public_url, m.width, m.height, m.size_bytes
    FROM unnest($4::uuid[], $5::int2[], $6::uuid[], $7::text[], $8::text[], $9::text[],
                $10::text[], $11::text[], $12::int4[], $13::int4[], $14::int8[])
             AS m(job_id, ordinal, id, media_type, mime_type, storage, storage_key, public_url,
                  width, height, size_bytes)
         JOIN job ON job.id = m.job_id
    RETURNING id, job_id, ordinal
), done AS (
    UPDATE generation_jobs j
    SET status = 'completed',
        progress = 100,
        result_media_id = media.id,
        model_used = $15,
        credits_used = job.credits,
        error_message = NULL,
        lease_expires_at = NULL,
        completed_at = now(),
        updated_at = now()
    FROM job JOIN media ON media.job_id = job.id AND media.ordinal = 0
    WHERE j.id = ANY ($1) AND j.id = job.id
    RETURNING j.id
)
