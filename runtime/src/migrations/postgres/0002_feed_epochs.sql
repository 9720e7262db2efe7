-- annals schema version 2 (PostgreSQL): feed epochs.
--
-- Events are ordered in the feed by (epoch, tx_id, position). Transaction ids belong to one
-- cluster: after a move to another one (pg_dump and restore, a logical-replication switch-over)
-- the stored ids can be ahead of the new cluster's counter. A commit that finds the newest
-- stored id ahead of the counter writes into the next epoch, so new events sort after every
-- old one; readers treat every epoch but the newest as complete.
ALTER TABLE {schema}.{prefix}events ADD COLUMN IF NOT EXISTS epoch integer NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS {prefix}events_feed_idx
    ON {schema}.{prefix}events (epoch, tx_id, position);

DROP INDEX IF EXISTS {schema}.{prefix}events_tx_idx;

-- Subscriptions keep their cursor's epoch beside its transaction id and position.
ALTER TABLE {schema}.{prefix}subscriptions
    ADD COLUMN IF NOT EXISTS cursor_epoch integer NOT NULL DEFAULT 0;

INSERT INTO {schema}.{prefix}schema_migrations (version, name)
VALUES (2, 'feed epochs')
ON CONFLICT DO NOTHING;
