-- Idempotent publishing: a publish with an Idempotency-Key stores it with the message, so a
-- retry within `publish.idempotency_window` — on any replica — finds the original instead of
-- committing a second message. Keys are scoped to their channel.
ALTER TABLE messages ADD COLUMN idempotency_key text;
CREATE INDEX messages_idempotency_key_idx ON messages (channel, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
