-- Outbound webhooks and their outbox (docs/webhooks.md).
--
-- `webhooks` holds every webhook, created through the API (`source = 'api'`) or written from
-- `[[webhooks.endpoints]]` at startup (`'config'`). The secret is stored as given, because
-- relay must sign with it; it is never returned by the API.
CREATE TABLE webhooks (
    id           text        PRIMARY KEY,
    url          text        NOT NULL,
    channels     text[]      NOT NULL,
    secret       text        NOT NULL,
    timeout_ms   integer     NOT NULL CHECK (timeout_ms > 0),
    max_attempts integer     NOT NULL CHECK (max_attempts > 0),
    source       text        NOT NULL CHECK (source IN ('api', 'config')),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Bumped by every change to `webhooks`, in the same transaction. A publish reads it with the
-- state of its channels (no extra round trip) and reloads the webhooks only when it moved.
CREATE TABLE webhook_generation (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation bigint  NOT NULL
);
INSERT INTO webhook_generation (singleton, generation) VALUES (true, 0);

-- The outbox: one row per (stored message, matching webhook), inserted by the statement that
-- stores the message, so a committed message always has its deliveries. A delivery is deleted
-- once delivered; a dead one stays (listable, retriable) until `webhooks.dead_retention`.
--
-- There is no foreign key to `webhooks`: a publish that read the webhooks just before one was
-- deleted must not fail. Deliveries of a deleted webhook are never claimed (the claim joins
-- `webhooks`) and are swept by the dispatcher's upkeep.
--
-- A dispatcher claims due rows with `FOR UPDATE SKIP LOCKED` and sets `locked_until` (its
-- lease) and `lease` (a token naming the claim): a replica that dies holding claims loses
-- them when `locked_until` passes, and a late answer of an expired claim cannot overwrite the
-- work of the replica that took it over (outcomes are written `WHERE lease = <its token>`).
CREATE TABLE webhook_deliveries (
    id              uuid        PRIMARY KEY,
    webhook_id      text        NOT NULL,
    channel         text        NOT NULL,
    message_offset  bigint      NOT NULL,
    -- A copy: retention may prune the message before its delivery succeeds.
    data            jsonb       NOT NULL,
    published_at    timestamptz NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    lease           uuid,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    dead_at         timestamptz
);

-- What the claim scans: due pending deliveries, oldest first.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
-- Deleting a webhook's deliveries, listing its dead ones.
CREATE INDEX webhook_deliveries_webhook_idx ON webhook_deliveries (webhook_id);
-- Pruning dead deliveries by age.
CREATE INDEX webhook_deliveries_dead_idx ON webhook_deliveries (dead_at) WHERE state = 'dead';
