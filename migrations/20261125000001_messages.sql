-- Per-channel message log with a gapless offset.
--
-- `channels.last_offset` is the channel's sequence counter. A publish increments it with
-- `INSERT … ON CONFLICT DO UPDATE … RETURNING` and inserts the message in the same transaction:
-- the row lock serialises publishers of one channel (across every replica), and a rolled back
-- transaction rolls the counter back too, so offsets are 1, 2, 3, … with no gaps.
CREATE TABLE channels (
    name        text        PRIMARY KEY,
    last_offset bigint      NOT NULL CHECK (last_offset >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE messages (
    channel    text        NOT NULL REFERENCES channels (name) ON DELETE CASCADE,
    "offset"   bigint      NOT NULL CHECK ("offset" > 0),
    data       jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, "offset")
);

-- Retention by age scans this.
CREATE INDEX messages_created_at_idx ON messages (created_at);
