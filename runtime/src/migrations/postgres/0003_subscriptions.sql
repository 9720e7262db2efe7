-- annals schema version 3 (PostgreSQL): durable subscriptions.
--
-- One row per subscription and partition. The filter and the start are kept as given when the
-- subscription was first opened (JSON), so a later open with other settings is refused instead
-- of silently reading a different stream. The lease (owner, fencing token, expiry) gives each
-- partition one worker at a time; every checkpoint write names the token it holds.
ALTER TABLE {schema}.{prefix}subscriptions
    ADD COLUMN IF NOT EXISTS start_at     text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS partitions   integer NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS attempts     integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_error   text,
    ADD COLUMN IF NOT EXISTS error_cursor text;

-- The workers running each subscription, each with the expiry of its last heartbeat: a
-- partitioned subscription's workers share its partitions evenly among the live ones.
CREATE TABLE IF NOT EXISTS {schema}.{prefix}subscribers (
    name       text NOT NULL,
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT {prefix}subscribers_pk PRIMARY KEY (name, owner)
);

INSERT INTO {schema}.{prefix}schema_migrations (version, name)
VALUES (3, 'durable subscriptions')
ON CONFLICT DO NOTHING;
