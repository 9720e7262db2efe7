-- annals schema version 3 (SQLite): pruning and erasure.
--
-- An erased aggregate keeps its row, without a key, so that the tombstone event its erasure
-- wrote keeps its type and place in the feed; `erased` says that its events are gone.
ALTER TABLE {prefix}aggregates ADD COLUMN erased INTEGER NOT NULL DEFAULT 0;

INSERT OR IGNORE INTO {prefix}schema_migrations (version, name, applied_at)
VALUES (3, 'pruning and erasure', CAST(strftime('%s', 'now') AS INTEGER) * 1000000);
