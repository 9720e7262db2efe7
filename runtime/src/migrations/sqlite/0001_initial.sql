-- annals schema version 1 (SQLite). `{prefix}` is the validated table prefix.

-- Applied migrations, one row each; `applied_at` in microseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS {prefix}schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS {prefix}aggregate_types (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS {prefix}event_types (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

-- One row per aggregate; `version` is the sequence of its last event.
CREATE TABLE IF NOT EXISTS {prefix}aggregates (
    id          BLOB PRIMARY KEY,
    type_id     INTEGER NOT NULL REFERENCES {prefix}aggregate_types (id),
    natural_key TEXT,
    version     INTEGER NOT NULL,
    UNIQUE (type_id, natural_key)
) WITHOUT ROWID;

-- The global feed. AUTOINCREMENT keeps positions increasing, never reused.
CREATE TABLE IF NOT EXISTS {prefix}events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    aggregate_id   BLOB NOT NULL REFERENCES {prefix}aggregates (id),
    sequence       INTEGER NOT NULL,
    event_type_id  INTEGER NOT NULL REFERENCES {prefix}event_types (id),
    schema_version INTEGER NOT NULL,
    payload        BLOB NOT NULL,
    metadata       BLOB,
    recorded_at    INTEGER NOT NULL,
    event_id       BLOB NOT NULL UNIQUE,
    UNIQUE (aggregate_id, sequence)
);

CREATE TABLE IF NOT EXISTS {prefix}snapshots (
    aggregate_id     BLOB NOT NULL REFERENCES {prefix}aggregates (id),
    snapshot_version INTEGER NOT NULL,
    version          INTEGER NOT NULL,
    payload          BLOB NOT NULL,
    recorded_at      INTEGER NOT NULL,
    PRIMARY KEY (aggregate_id, snapshot_version, version)
) WITHOUT ROWID;

-- Durable subscriptions: cursor, filter, lease with fencing token, state.
CREATE TABLE IF NOT EXISTS {prefix}subscriptions (
    name             TEXT NOT NULL,
    partition        INTEGER NOT NULL DEFAULT 0,
    filter           TEXT,
    cursor_tx        INTEGER NOT NULL DEFAULT 0,
    cursor_position  INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_token      INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    state            TEXT NOT NULL DEFAULT 'active',
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (name, partition)
) WITHOUT ROWID;

-- Recorded here, not by the code that applies it, so SQL applied by hand counts too.
INSERT OR IGNORE INTO {prefix}schema_migrations (version, name, applied_at)
VALUES (1, 'initial schema', CAST(strftime('%s', 'now') AS INTEGER) * 1000000);
