-- Measured (issue 7): with many users a queue position still cost time linear in the queue's
-- depth. Fair share gives a user's next job the key after their last one, so a new user's job,
-- or a light user's, joins near the head or the middle of the line and its position counted
-- every queued job on that side: after 7,000 jobs of 1,000 users were queued, 6,321 index
-- entries, 3.4 of an enqueue's 4.3 ms, and every status poll of such a job paid the same.
--
-- So the queued jobs are also counted per fair-share level (key), and a position sums the
-- levels on the job's shorter side instead of counting their jobs: as many rows as levels
-- times the shards in use, where one level holds a job of each user with jobs that deep.
-- A level's count lives in up to 32 shards, chosen by the job's id, so that users joining the
-- same level at once rarely wait on one row, and so that the statement taking a job out of
-- the line finds the very row that counted it in. A row that falls to zero is deleted by that
-- statement (CHECK: no row holds zero or less), so the table holds only levels with queued
-- jobs, and one user's deep queue (a level per job) costs a row per queued job, no garbage.
-- The same triggers as the queue tally keep it (V12), in the same transactions, so read in
-- one snapshot with the jobs each level's sum equals its jobs' count.
CREATE TABLE queue_levels (
    fair_key bigint   NOT NULL,
    shard    smallint NOT NULL CHECK (shard BETWEEN 0 AND 31),
    queued   bigint   NOT NULL CHECK (queued > 0),
    PRIMARY KEY (fair_key, shard)
) WITH (fillfactor = 70);

-- A UUIDv7's last byte is random.
CREATE FUNCTION queue_level_shard(id uuid) RETURNS smallint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT (get_byte(uuid_send(id), 15) & 31)::smallint $$;

-- The queued jobs of levels low to high. Statistics taken while the line was empty (a quiet
-- hour, a fresh deploy) would have every plan read this table whole, however long the line
-- has grown since; the index on the level is the only sensible way in, so it is the only one
-- offered, here and where a statement's moves are written (queue_levels_move).
CREATE FUNCTION queue_levels_sum(low bigint, high bigint) RETURNS bigint
    LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
BEGIN
    RETURN (SELECT coalesce(sum(queued), 0) FROM queue_levels WHERE fair_key BETWEEN low AND high);
END $$;

CREATE OR REPLACE FUNCTION queue_tally_joined() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queue_tally_add(1);
    INSERT INTO queue_levels AS l (fair_key, shard, queued)
    VALUES (NEW.fair_key, queue_level_shard(NEW.id), 1)
    ON CONFLICT (fair_key, shard) DO UPDATE SET queued = l.queued + 1;
    RETURN NULL;
END $$;

-- A statement's moves, netted per level row: rows it takes jobs from are locked first, in key
-- order (two statements taking from the same rows in different orders would deadlock), then
-- deleted where they fall to zero and lowered elsewhere; rows it adds jobs to are upserted in
-- key order. So statements that only take (claims, cancels, deletes) or only add (requeues)
-- lock in one order and cannot deadlock on these rows; one that took from some levels and
-- added to others at once could, against another doing the opposite (no statement does). A
-- level row missing for a job leaving the line means the count has drifted: the statement
-- fails rather than counting on from a wrong number.
--
-- A claim locks the rows of the jobs it takes, in the levels at the line's head, which is
-- also where a new user's job joins: the one waits for the other's commit when they meet on
-- a row (a claim of 20 from a level spread over 32 rows often does). V12's tally, by
-- transaction, made such meetings rare; a level count by transaction would need its rows
-- to go below zero and a sweep of emptied levels, and is not built.
CREATE FUNCTION queue_levels_move(keys bigint[], shards smallint[], ns bigint[]) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    taken   bigint := (SELECT count(*) FROM unnest(ns) n WHERE n < 0);
    hit     bigint;
    lowered bigint;
BEGIN
    IF taken > 0 THEN
        PERFORM 1 FROM queue_levels l
        WHERE (l.fair_key, l.shard) IN (SELECT k, s FROM unnest(keys, shards, ns) d (k, s, n) WHERE n < 0)
        ORDER BY l.fair_key, l.shard
        FOR UPDATE;
        DELETE FROM queue_levels l
        USING unnest(keys, shards, ns) d (k, s, n)
        WHERE l.fair_key = d.k AND l.shard = d.s AND d.n < 0 AND l.queued + d.n = 0;
        GET DIAGNOSTICS hit = ROW_COUNT;
        IF hit < taken THEN
            UPDATE queue_levels l SET queued = l.queued + d.n
            FROM unnest(keys, shards, ns) d (k, s, n)
            WHERE l.fair_key = d.k AND l.shard = d.s AND d.n < 0;
            GET DIAGNOSTICS lowered = ROW_COUNT;
            IF hit + lowered <> taken THEN
                RAISE EXCEPTION 'queue_levels: % of % level rows to lower were found', hit + lowered, taken;
            END IF;
        END IF;
    END IF;
    IF taken < cardinality(ns) THEN
        INSERT INTO queue_levels AS l (fair_key, shard, queued)
        SELECT k, s, n FROM unnest(keys, shards, ns) d (k, s, n)
        WHERE n > 0
        ORDER BY k, s
        ON CONFLICT (fair_key, shard) DO UPDATE SET queued = l.queued + excluded.queued;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION queue_tally_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    left_line bigint := (SELECT count(*) FROM moved_out WHERE status = 'queued');
    joined    bigint := 0;
    keys      bigint[];
    shards    smallint[];
    ns        bigint[];
BEGIN
    IF TG_OP = 'UPDATE' THEN
        joined := (SELECT count(*) FROM moved_in WHERE status = 'queued');
    END IF;
    IF left_line = 0 AND joined = 0 THEN
        RETURN NULL;
    END IF;
    IF joined <> left_line THEN
        PERFORM queue_tally_add(joined - left_line);
    END IF;
    IF joined = 0 THEN
        SELECT array_agg(k), array_agg(s), array_agg(-n) INTO keys, shards, ns
        FROM (SELECT fair_key AS k, queue_level_shard(id) AS s, count(*) AS n
              FROM moved_out WHERE status = 'queued' GROUP BY 1, 2) d;
    ELSE
        -- A job that stays queued (a message re-sent) leaves its level as it found it.
        SELECT array_agg(k), array_agg(s), array_agg(n) INTO keys, shards, ns
        FROM (SELECT k, s, sum(n)::int8 AS n
              FROM (SELECT fair_key AS k, queue_level_shard(id) AS s, -1 AS n FROM moved_out WHERE status = 'queued'
                    UNION ALL
                    SELECT fair_key, queue_level_shard(id), 1 FROM moved_in WHERE status = 'queued') m
              GROUP BY k, s HAVING sum(n) <> 0) d;
    END IF;
    IF keys IS NOT NULL THEN
        PERFORM queue_levels_move(keys, shards, ns);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION queue_tally_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Every shard, without a condition a stale snapshot could misjudge.
    UPDATE queue_tally SET queued = 0;
    DELETE FROM queue_levels;
    RETURN NULL;
END $$;

-- The triggers exist already (V12) and now keep both counts; taking their table's lock here
-- holds off writers until this migration commits, so the count below cannot miss a job.
LOCK TABLE generation_jobs IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO queue_levels (fair_key, shard, queued)
SELECT fair_key, queue_level_shard(id), count(*)
FROM generation_jobs WHERE status = 'queued'
GROUP BY 1, 2;
