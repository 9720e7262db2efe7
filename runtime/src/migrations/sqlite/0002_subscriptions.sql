-- annals schema version 2 (SQLite): durable subscriptions.
--
-- One row per subscription and partition. The filter and the start are kept as given when the
-- subscription was first opened (JSON), so a later open with other settings is refused instead
-- of silently reading a different stream. The lease (owner, fencing token, expiry in
-- microseconds since the Unix epoch) gives each partition one worker at a time; every
-- checkpoint write names the token it holds.
ALTER TABLE {prefix}subscriptions ADD COLUMN start_at TEXT NOT NULL DEFAULT '';
ALTER TABLE {prefix}subscriptions ADD COLUMN partitions INTEGER NOT NULL DEFAULT 1;
ALTER TABLE {prefix}subscriptions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE {prefix}subscriptions ADD COLUMN last_error TEXT;
ALTER TABLE {prefix}subscriptions ADD COLUMN error_cursor TEXT;

-- The workers running each subscription, each with the expiry of its last heartbeat: a
-- partitioned subscription's workers share its partitions evenly among the live ones.
CREATE TABLE IF NOT EXISTS {prefix}subscribers (
    name       TEXT NOT NULL,
    owner      TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (name, owner)
) WITHOUT ROWID;

-- Events a subscription parked after its handler kept failing on them, one per aggregate: the
-- later events of that aggregate are held back for the subscription until the parked one is
-- retried or skipped. `version` is the aggregate's first version not yet delivered; `state` is
-- parked, or what an operator asked for (retry, skip).
CREATE TABLE IF NOT EXISTS {prefix}parked (
    name         TEXT NOT NULL,
    aggregate_id BLOB NOT NULL,
    partition    INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    event_id     BLOB NOT NULL,
    cursor       TEXT NOT NULL,
    error        TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT 'parked',
    parked_at    INTEGER NOT NULL,
    PRIMARY KEY (name, aggregate_id)
) WITHOUT ROWID;

INSERT OR IGNORE INTO {prefix}schema_migrations (version, name, applied_at)
VALUES (2, 'durable subscriptions', CAST(strftime('%s', 'now') AS INTEGER) * 1000000);
