-- Access log entries written by the `postgres` access-log sink (batched inserts).
CREATE TABLE access_log (
    id          bigserial   PRIMARY KEY,
    ts          timestamptz NOT NULL,
    kind        text        NOT NULL,           -- http | websocket | sse
    request_id  text        NOT NULL,
    trace_id    text,
    method      text        NOT NULL,
    route       text,
    path        text        NOT NULL,           -- query secrets already redacted
    status      integer     NOT NULL,
    latency_ms  double precision NOT NULL,      -- sessions: their duration
    bytes_in    bigint      NOT NULL,
    bytes_out   bigint      NOT NULL,
    client_ip   text,
    user_agent  text,
    subject     text,
    session     jsonb                           -- frames, channels and close code of a session
);

CREATE INDEX access_log_ts_idx ON access_log (ts);
CREATE INDEX access_log_request_id_idx ON access_log (request_id);
