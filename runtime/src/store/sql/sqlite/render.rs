//! The SQL text of the SQLite store, rendered once per table prefix. Pure functions, no I/O: the
//! tests below pin the text of representative statements, so a change to one shows up as a
//! reviewed diff.

use crate::filter::FilterShape;
use crate::store::sql::migrate::{Dialect, render, templates};
use crate::store::sql::types::TypeKind;

/// Rows per multi-row event INSERT: 8 bound values each, far under SQLite's limit of 32,766
/// parameters, and few enough distinct statement shapes to stay in the statement cache.
pub(super) const EVENT_CHUNK: usize = 500;

/// Bound values per event row.
const EVENT_COLUMNS: usize = 8;

/// Every statement the store runs, with the table prefix filled in. Values are always bound
/// (`?1`, `?2`, …), never rendered.
#[derive(Debug)]
pub(super) struct Statements {
    pub row_by_id: String,
    pub row_by_key: String,
    pub snapshot: String,
    pub stream: String,
    pub cas_version: String,
    pub current_version: String,
    /// Sets an aggregate's key (`NULL` releases it); changes no row when another aggregate of
    /// the type holds the key.
    pub set_key: String,
    pub insert_aggregate: String,
    /// Where one event, by id, is stored.
    pub find_event: String,
    pub insert_snapshot: String,
    pub read_stream: String,
    pub read_stream_backward: String,
    pub read_feed: String,
    /// The filtered feed, one statement per [`FilterShape`] index.
    pub read_feed_matching: Vec<String>,
    /// The newest position ever given out: pruned or erased events do not move it back.
    pub feed_end: String,
    /// Deletes an aggregate's events up to its newest snapshot of a shape.
    pub prune_events: String,
    /// Deletes an aggregate's snapshots older than the `?3 + 1`-th newest of a shape.
    pub prune_snapshots: String,
    /// Deletes an erased aggregate's events up to a version.
    pub erase_events: String,
    pub erase_snapshots: String,
    /// An aggregate's version and whether it is erased.
    pub erase_state: String,
    pub mark_erased: String,
    pub insert_aggregate_type: String,
    pub insert_event_type: String,
    pub all_aggregate_types: String,
    pub all_event_types: String,
    insert_events_prefix: String,
}

/// The columns of a feed row, in the order [`super::feed`] reads them.
const FEED_COLUMNS: &str = "e.position, e.aggregate_id, a.type_id, e.sequence, e.event_type_id, \
     e.schema_version, e.payload, e.metadata, e.recorded_at, e.event_id, a.natural_key";

/// The last byte of an event's aggregate id (a 16-byte blob), from its hex digits: the byte
/// every store splits partitions by (see `Filter`).
const LAST_BYTE: &str = "((instr('0123456789ABCDEF', substr(hex(e.aggregate_id), 31, 1)) - 1) * 16 \
     + instr('0123456789ABCDEF', substr(hex(e.aggregate_id), 32, 1)) - 1)";

/// The feed read with the conditions of `shape`. Parameters: the position after, the limit,
/// then one per condition present, in this order: event type names and aggregate type names (as
/// JSON arrays, matched by name inside the statement so that a type written meanwhile by
/// another process is not missed), the aggregate id, the natural key, the partition and the
/// number of partitions.
fn feed_matching_sql(shape: FilterShape) -> String {
    let mut conditions = String::new();
    let mut next = 3;
    let mut param = || {
        let p = format!("?{next}");
        next += 1;
        p
    };
    if shape.event_types {
        conditions.push_str(&format!(
            " AND e.event_type_id IN (SELECT id FROM {{prefix}}event_types WHERE name IN (SELECT value FROM json_each({})))",
            param()
        ));
    }
    if shape.aggregate_types {
        conditions.push_str(&format!(
            " AND a.type_id IN (SELECT id FROM {{prefix}}aggregate_types WHERE name IN (SELECT value FROM json_each({})))",
            param()
        ));
    }
    if shape.aggregate {
        conditions.push_str(&format!(" AND e.aggregate_id = {}", param()));
    }
    if shape.key {
        conditions.push_str(&format!(" AND a.natural_key = {}", param()));
    }
    if shape.partition {
        let (partition, partitions) = (param(), param());
        conditions.push_str(&format!(" AND {LAST_BYTE} % {partitions} = {partition}"));
    }
    format!(
        "SELECT {FEED_COLUMNS} FROM {{prefix}}events e JOIN {{prefix}}aggregates a ON a.id = e.aggregate_id WHERE e.position > ?1{conditions} ORDER BY e.position LIMIT ?2"
    )
}

impl Statements {
    pub fn new(prefix: &str) -> Self {
        let sql = |text: &str| render(text, prefix, "");
        Statements {
            row_by_id: sql(
                "SELECT a.id, a.type_id, a.natural_key, a.version, a.erased FROM {prefix}aggregates a WHERE a.id = ?1",
            ),
            row_by_key: sql(
                "SELECT a.id, a.type_id, a.natural_key, a.version, a.erased FROM {prefix}aggregates a WHERE a.type_id = ?1 AND a.natural_key = ?2",
            ),
            snapshot: sql(
                "SELECT version, payload FROM {prefix}snapshots WHERE aggregate_id = ?1 AND snapshot_version = ?2 AND version <= ?3 ORDER BY version DESC LIMIT 1",
            ),
            stream: sql(
                "SELECT sequence, position, event_type_id, schema_version, payload FROM {prefix}events WHERE aggregate_id = ?1 AND sequence > ?2 AND sequence <= ?3 ORDER BY sequence",
            ),
            cas_version: sql(
                "UPDATE {prefix}aggregates SET version = ?1 WHERE id = ?2 AND version = ?3",
            ),
            current_version: sql("SELECT version FROM {prefix}aggregates WHERE id = ?1"),
            find_event: sql(
                "SELECT aggregate_id, sequence FROM {prefix}events WHERE event_id = ?1",
            ),
            set_key: sql("UPDATE OR IGNORE {prefix}aggregates SET natural_key = ?2 WHERE id = ?1"),
            insert_aggregate: sql(
                "INSERT INTO {prefix}aggregates (id, type_id, natural_key, version) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            ),
            insert_snapshot: sql(
                "INSERT OR REPLACE INTO {prefix}snapshots (aggregate_id, snapshot_version, version, payload, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            ),
            read_stream: sql(&format!(
                "SELECT {FEED_COLUMNS} FROM {{prefix}}events e JOIN {{prefix}}aggregates a ON a.id = e.aggregate_id WHERE e.aggregate_id = ?1 AND e.sequence BETWEEN ?2 AND ?3 ORDER BY e.sequence LIMIT ?4"
            )),
            read_stream_backward: sql(&format!(
                "SELECT {FEED_COLUMNS} FROM {{prefix}}events e JOIN {{prefix}}aggregates a ON a.id = e.aggregate_id WHERE e.aggregate_id = ?1 AND e.sequence BETWEEN ?2 AND ?3 ORDER BY e.sequence DESC LIMIT ?4"
            )),
            read_feed: sql(&format!(
                "SELECT {FEED_COLUMNS} FROM {{prefix}}events e JOIN {{prefix}}aggregates a ON a.id = e.aggregate_id WHERE e.position > ?1 ORDER BY e.position LIMIT ?2"
            )),
            read_feed_matching: (0..FilterShape::COUNT)
                .map(|index| sql(&feed_matching_sql(FilterShape::from_index(index))))
                .collect(),
            feed_end: sql(
                "SELECT max(p) FROM (SELECT max(position) AS p FROM {prefix}events UNION ALL SELECT seq FROM sqlite_sequence WHERE name = '{prefix}events')",
            ),
            prune_events: sql(
                "DELETE FROM {prefix}events WHERE aggregate_id = ?1 AND sequence <= (SELECT max(version) FROM {prefix}snapshots WHERE aggregate_id = ?1 AND snapshot_version = ?2)",
            ),
            prune_snapshots: sql(
                "DELETE FROM {prefix}snapshots WHERE aggregate_id = ?1 AND version < (SELECT version FROM {prefix}snapshots WHERE aggregate_id = ?1 AND snapshot_version = ?2 ORDER BY version DESC LIMIT 1 OFFSET ?3)",
            ),
            erase_events: sql(
                "DELETE FROM {prefix}events WHERE aggregate_id = ?1 AND sequence <= ?2",
            ),
            erase_snapshots: sql("DELETE FROM {prefix}snapshots WHERE aggregate_id = ?1"),
            erase_state: sql("SELECT version, erased FROM {prefix}aggregates WHERE id = ?1"),
            mark_erased: sql("UPDATE {prefix}aggregates SET erased = 1 WHERE id = ?1"),
            insert_aggregate_type: sql(
                "INSERT OR IGNORE INTO {prefix}aggregate_types (name) VALUES (?1)",
            ),
            insert_event_type: sql("INSERT OR IGNORE INTO {prefix}event_types (name) VALUES (?1)"),
            all_aggregate_types: sql("SELECT id, name FROM {prefix}aggregate_types"),
            all_event_types: sql("SELECT id, name FROM {prefix}event_types"),
            insert_events_prefix: sql(
                "INSERT INTO {prefix}events (aggregate_id, sequence, event_type_id, schema_version, payload, metadata, recorded_at, event_id) VALUES ",
            ),
        }
    }

    /// Writes a type name to its table (a name already there is kept with its id).
    pub fn insert_type(&self, kind: TypeKind) -> &str {
        match kind {
            TypeKind::Aggregate => &self.insert_aggregate_type,
            TypeKind::Event => &self.insert_event_type,
        }
    }

    /// Reads a whole type table as `(id, name)` rows.
    pub fn all_types(&self, kind: TypeKind) -> &str {
        match kind {
            TypeKind::Aggregate => &self.all_aggregate_types,
            TypeKind::Event => &self.all_event_types,
        }
    }

    /// The INSERT of `rows` events in one statement, parameters numbered row by row.
    pub fn insert_events(&self, rows: usize) -> String {
        // "(?NNNN,…)," is under 64 characters per row at 500 rows.
        let mut sql = String::with_capacity(self.insert_events_prefix.len() + rows * 64);
        sql.push_str(&self.insert_events_prefix);
        for row in 0..rows {
            if row > 0 {
                sql.push(',');
            }
            sql.push('(');
            for column in 0..EVENT_COLUMNS {
                if column > 0 {
                    sql.push(',');
                }
                sql.push('?');
                sql.push_str(&(row * EVENT_COLUMNS + column + 1).to_string());
            }
            sql.push(')');
        }
        sql
    }
}

/// Every table the SQLite migrations create, under `prefix`, read from the migrations' own text
/// so the list cannot fall behind them: the names a foreign table could collide with.
pub(super) fn annals_tables(prefix: &str) -> impl Iterator<Item = String> + '_ {
    const CREATE: &str = "CREATE TABLE IF NOT EXISTS {prefix}";
    templates(Dialect::Sqlite)
        .flat_map(|sql| {
            sql.match_indices(CREATE)
                .map(move |(at, _)| &sql[at + CREATE.len()..])
        })
        .map(move |rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            format!("{prefix}{name}")
        })
}

/// `{prefix}schema_migrations`.
pub(super) fn migrations_table(prefix: &str) -> String {
    format!("{prefix}schema_migrations")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_event_insert() {
        let sql = Statements::new("bank_");
        assert_eq!(
            sql.insert_events(1),
            "INSERT INTO bank_events (aggregate_id, sequence, event_type_id, schema_version, payload, metadata, recorded_at, event_id) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)"
        );
        assert_eq!(
            sql.insert_events(2),
            "INSERT INTO bank_events (aggregate_id, sequence, event_type_id, schema_version, payload, metadata, recorded_at, event_id) VALUES (?1,?2,?3,?4,?5,?6,?7,?8),(?9,?10,?11,?12,?13,?14,?15,?16)"
        );
        let full = sql.insert_events(EVENT_CHUNK);
        assert!(full.ends_with(",(?3993,?3994,?3995,?3996,?3997,?3998,?3999,?4000)"));
        assert_eq!(full.matches('(').count(), EVENT_CHUNK + 1);
    }

    #[test]
    fn the_partition_byte_is_the_ids_last() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let sql = format!("SELECT {LAST_BYTE} FROM (SELECT ?1 AS aggregate_id) e");
        for last in 0..=255u8 {
            let mut id = [0x5a_u8; 16];
            id[15] = last;
            let got: i64 = conn.query_row(&sql, [id.as_slice()], |r| r.get(0)).unwrap();
            assert_eq!(got, i64::from(last));
        }
    }

    #[test]
    fn filtered_feed_statements() {
        let sql = Statements::new("annals_");
        let all = FilterShape::from_index(FilterShape::COUNT - 1);
        assert_eq!(
            sql.read_feed_matching[all.index()],
            "SELECT e.position, e.aggregate_id, a.type_id, e.sequence, e.event_type_id, e.schema_version, e.payload, e.metadata, e.recorded_at, e.event_id, a.natural_key FROM annals_events e JOIN annals_aggregates a ON a.id = e.aggregate_id WHERE e.position > ?1 AND e.event_type_id IN (SELECT id FROM annals_event_types WHERE name IN (SELECT value FROM json_each(?3))) AND a.type_id IN (SELECT id FROM annals_aggregate_types WHERE name IN (SELECT value FROM json_each(?4))) AND e.aggregate_id = ?5 AND a.natural_key = ?6 AND ((instr('0123456789ABCDEF', substr(hex(e.aggregate_id), 31, 1)) - 1) * 16 + instr('0123456789ABCDEF', substr(hex(e.aggregate_id), 32, 1)) - 1) % ?8 = ?7 ORDER BY e.position LIMIT ?2"
        );
        let by_id = FilterShape {
            event_types: false,
            aggregate_types: false,
            aggregate: true,
            key: false,
            partition: false,
        };
        assert!(sql.read_feed_matching[by_id.index()].ends_with(
            "WHERE e.position > ?1 AND e.aggregate_id = ?3 ORDER BY e.position LIMIT ?2"
        ));
    }

    #[test]
    fn commit_and_load_statements() {
        let sql = Statements::new("annals_");
        assert_eq!(
            sql.cas_version,
            "UPDATE annals_aggregates SET version = ?1 WHERE id = ?2 AND version = ?3"
        );
        assert_eq!(
            sql.insert_aggregate,
            "INSERT INTO annals_aggregates (id, type_id, natural_key, version) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            sql.stream,
            "SELECT sequence, position, event_type_id, schema_version, payload FROM annals_events WHERE aggregate_id = ?1 AND sequence > ?2 AND sequence <= ?3 ORDER BY sequence"
        );
        assert_eq!(
            sql.read_feed,
            "SELECT e.position, e.aggregate_id, a.type_id, e.sequence, e.event_type_id, e.schema_version, e.payload, e.metadata, e.recorded_at, e.event_id, a.natural_key FROM annals_events e JOIN annals_aggregates a ON a.id = e.aggregate_id WHERE e.position > ?1 ORDER BY e.position LIMIT ?2"
        );
        assert_eq!(
            sql.insert_type(TypeKind::Event),
            "INSERT OR IGNORE INTO annals_event_types (name) VALUES (?1)"
        );
        assert_eq!(
            sql.all_types(TypeKind::Aggregate),
            "SELECT id, name FROM annals_aggregate_types"
        );
        let tables: Vec<String> = annals_tables("x_").collect();
        for table in [
            "x_schema_migrations",
            "x_events",
            "x_aggregates",
            "x_subscriptions",
        ] {
            assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
        }
        assert_eq!(migrations_table("x_"), "x_schema_migrations");
    }
}
