-- Deletes up to $2 completion webhooks delivered or given up more than $1 days ago. One settles
-- after its job was created, so only those of jobs created before then are looked at: a range
-- of the job-id index (V16), not a scan of the table.
DELETE FROM webhook_deliveries
WHERE event_id IN (
    SELECT event_id FROM webhook_deliveries
    WHERE job_id < uuid_v7_floor(now() - make_interval(days => $1::int4))
      AND coalesce(delivered_at, given_up_at) < now() - make_interval(days => $1::int4)
    ORDER BY job_id
    LIMIT $2)
