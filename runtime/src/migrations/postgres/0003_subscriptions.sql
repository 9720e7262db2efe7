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

-- Events a subscription parked after its handler kept failing on them, one per aggregate: the
-- later events of that aggregate are held back for the subscription until the parked one is
-- retried or skipped. `version` is the aggregate's first version not yet delivered; `state` is
-- parked, or what an operator asked for (retry, skip).
CREATE TABLE IF NOT EXISTS {schema}.{prefix}parked (
    name         text NOT NULL,
    aggregate_id uuid NOT NULL,
    partition    integer NOT NULL,
    version      bigint NOT NULL,
    event_id     uuid NOT NULL,
    cursor       text NOT NULL,
    error        text NOT NULL,
    attempts     integer NOT NULL,
    state        text NOT NULL DEFAULT 'parked',
    parked_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT {prefix}parked_pk PRIMARY KEY (name, aggregate_id)
);

INSERT INTO {schema}.{prefix}schema_migrations (version, name)
VALUES (3, 'durable subscriptions')
ON CONFLICT DO NOTHING;
