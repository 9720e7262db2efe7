-- annals schema version 2 (PostgreSQL): feed epochs.
--
-- Events are ordered in the feed by (epoch, tx_id, position). Transaction ids belong to one
-- cluster: after a move to another one (pg_dump and restore, a logical-replication switch-over)
-- the stored ids can be ahead of the new cluster's counter. A commit that finds the newest
-- stored id ahead of the counter writes into the next epoch, so new events sort after every
-- old one; readers treat every epoch but the newest as complete.
--
-- The current epoch is kept in a one-row table with the start time of the server that last
-- checked it: a commit reads it by key, and only the first commit after a server start (a
-- restart, a restore, a failover, a switch-over: every move starts another server) looks at the
-- newest stored transaction id.
ALTER TABLE {schema}.{prefix}events ADD COLUMN IF NOT EXISTS epoch integer NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS {prefix}events_feed_idx
    ON {schema}.{prefix}events (epoch, tx_id, position);

DROP INDEX IF EXISTS {schema}.{prefix}events_tx_idx;

CREATE TABLE IF NOT EXISTS {schema}.{prefix}feed_epoch (
    id             integer NOT NULL,
    epoch          integer NOT NULL,
    server_started timestamptz,
    CONSTRAINT {prefix}feed_epoch_pk PRIMARY KEY (id),
    CONSTRAINT {prefix}feed_epoch_one_row CHECK (id = 1)
);

INSERT INTO {schema}.{prefix}feed_epoch (id, epoch, server_started)
SELECT 1, COALESCE(max(epoch), 0), NULL FROM {schema}.{prefix}events
ON CONFLICT DO NOTHING;

-- Subscriptions keep their cursor's epoch beside its transaction id and position.
ALTER TABLE {schema}.{prefix}subscriptions
    ADD COLUMN IF NOT EXISTS cursor_epoch integer NOT NULL DEFAULT 0;

INSERT INTO {schema}.{prefix}schema_migrations (version, name)
VALUES (2, 'feed epochs')
ON CONFLICT DO NOTHING;
