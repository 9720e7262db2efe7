-- annals schema version 4 (PostgreSQL): pruning and erasure.
--
-- An erased aggregate keeps its row, without a key, so that the tombstone event its erasure
-- wrote keeps its type and place in the feed; `erased` says that its events are gone.
ALTER TABLE {schema}.{prefix}aggregates ADD COLUMN IF NOT EXISTS erased boolean NOT NULL DEFAULT false;

-- Where deleted events stood in the feed (no payload, no id): a reader whose cursor is the place
-- of a pruned or erased event reads on from there, instead of taking the cursor for one from
-- another store.
CREATE TABLE IF NOT EXISTS {schema}.{prefix}deleted_events (
    position bigint NOT NULL,
    epoch    integer NOT NULL,
    tx_id    xid8 NOT NULL,
    CONSTRAINT {prefix}deleted_events_pk PRIMARY KEY (position)
);

INSERT INTO {schema}.{prefix}schema_migrations (version, name)
VALUES (4, 'pruning and erasure')
ON CONFLICT DO NOTHING;
