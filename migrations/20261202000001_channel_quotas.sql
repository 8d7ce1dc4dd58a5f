-- Channel quotas and the removal of empty channels by retention.
--
-- `created_by` is the token subject that created the channel ('' without authentication):
-- `limits.channels_per_subject` counts a subject's rows, so publishing to random names cannot
-- grow this table for ever.
ALTER TABLE channels ADD COLUMN created_by text NOT NULL DEFAULT '';
CREATE INDEX channels_created_by_idx ON channels (created_by);

-- Retention removes channels whose messages have all been pruned. A removed channel's last
-- offset is kept here first, folded into one of 65,536 buckets by a hash of its name; a channel
-- created (again) starts after its bucket's floor. So a name's offsets never go backwards — a
-- subscriber's position or a client's `since` stays meaningful — and this table stays bounded.
-- Every bucket exists from the start, so readers can lock the row (see `append`).
CREATE FUNCTION channel_bucket(name text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT ('x' || substr(md5(name), 1, 4))::bit(16)::integer $$;

CREATE TABLE channel_floors (
    bucket integer PRIMARY KEY CHECK (bucket >= 0 AND bucket < 65536),
    floor  bigint  NOT NULL CHECK (floor >= 0)
);
INSERT INTO channel_floors (bucket, floor) SELECT b, 0 FROM generate_series(0, 65535) AS b;
