-- Retention: the poller deletes settled jobs (when JOB_RETENTION_DAYS is set) and settled
-- completion webhooks older than their retention. Job ids are UUIDv7, whose first 48 bits are
-- the creation time in milliseconds, so "jobs created before t" is a range of the primary key
-- (and of any index that leads with a job id): the purge needs no index of its own, and no
-- state change pays for one.
--
-- The smallest UUIDv7 of a moment. STABLE, not IMMUTABLE: extract() from a timestamptz is.
CREATE FUNCTION uuid_v7_floor(at timestamptz) RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM at) * 1000)::int8), 12, '0')
            || '70008000000000000000')::uuid
$$;
