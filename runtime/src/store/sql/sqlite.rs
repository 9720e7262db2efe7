//! The SQLite store (`sqlite://path`, `sqlite::memory:`): the embedded default.
//!
//! One writer connection commits in `BEGIN IMMEDIATE` transactions, so writers of every process
//! sharing the file queue on SQLite's lock instead of failing on a lock upgrade; a pool of
//! read-only connections serves loads and feed reads concurrently (WAL). Because SQLite runs one
//! write transaction at a time, global positions are assigned in commit order and the feed can
//! be read by position.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row, SqlSafeStr, SqlStr, SqlitePool};

use super::backend_error;
use super::migrate::{Dialect, plan_migrations, render};
use super::records::{aggregate_id, uuid_from_bytes};
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::FeedPage;
use crate::metadata::Metadata;
use crate::registry::Registry;
use crate::store::{
    AggregateRow, Backend, BoxFuture, Change, CommitBatch, CommitSignal, LoadRequest, LoadedStream,
    Locate, StoreOptions, StoredSnapshot, StreamEvent, Synchronous, from_micros, to_i64, to_micros,
    to_u64,
};

/// Rows per multi-row event INSERT: 9 bound values each, far under SQLite's limit of 32,766
/// parameters, and few enough distinct statement shapes to stay in the statement cache.
const EVENT_CHUNK: usize = 500;
const EVENT_COLUMNS: usize = 8;

/// The statements, rendered once at open for the table prefix.
struct Statements {
    row_by_id: SqlStr,
    row_by_key: SqlStr,
    snapshot: SqlStr,
    stream: SqlStr,
    cas_version: SqlStr,
    current_version: SqlStr,
    insert_aggregate: SqlStr,
    insert_snapshot: SqlStr,
    read_stream: SqlStr,
    read_feed: SqlStr,
    table_exists: SqlStr,
    insert_aggregate_type: SqlStr,
    insert_event_type: SqlStr,
    all_aggregate_types: SqlStr,
    all_event_types: SqlStr,
    insert_events_prefix: String,
}

impl Statements {
    fn new(p: &str) -> Self {
        let sql = |text: &str| AssertSqlSafe(render(text, p, "")).into_sql_str();
        Statements {
            row_by_id: sql(
                "SELECT a.id, a.type_id, a.natural_key, a.version FROM {prefix}aggregates a WHERE a.id = ?1",
            ),
            row_by_key: sql(
                "SELECT a.id, a.type_id, a.natural_key, a.version FROM {prefix}aggregates a WHERE a.type_id = ?1 AND a.natural_key = ?2",
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
            insert_aggregate: sql(
                "INSERT INTO {prefix}aggregates (id, type_id, natural_key, version) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            ),
            insert_snapshot: sql(
                "INSERT OR REPLACE INTO {prefix}snapshots (aggregate_id, snapshot_version, version, payload, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            ),
            read_stream: sql(
                "SELECT e.position, e.aggregate_id, a.type_id, e.sequence, e.event_type_id, e.schema_version, e.payload, e.metadata, e.recorded_at, e.event_id FROM {prefix}events e JOIN {prefix}aggregates a ON a.id = e.aggregate_id WHERE e.aggregate_id = ?1 AND e.sequence > ?2 ORDER BY e.sequence",
            ),
            read_feed: sql(
                "SELECT e.position, e.aggregate_id, a.type_id, e.sequence, e.event_type_id, e.schema_version, e.payload, e.metadata, e.recorded_at, e.event_id FROM {prefix}events e JOIN {prefix}aggregates a ON a.id = e.aggregate_id WHERE e.position > ?1 ORDER BY e.position LIMIT ?2",
            ),
            table_exists: sql("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?1"),
            insert_aggregate_type: sql(
                "INSERT OR IGNORE INTO {prefix}aggregate_types (name) VALUES (?1)",
            ),
            insert_event_type: sql("INSERT OR IGNORE INTO {prefix}event_types (name) VALUES (?1)"),
            all_aggregate_types: sql("SELECT id, name FROM {prefix}aggregate_types"),
            all_event_types: sql("SELECT id, name FROM {prefix}event_types"),
            insert_events_prefix: render(
                "INSERT INTO {prefix}events (aggregate_id, sequence, event_type_id, schema_version, payload, metadata, recorded_at, event_id) VALUES ",
                p,
                "",
            ),
        }
    }
}

/// Type names and their ids in this store, both ways.
#[derive(Default)]
struct TypeCache {
    aggregate_ids: HashMap<String, i64>,
    aggregate_names: HashMap<i64, Arc<str>>,
    event_ids: HashMap<String, i64>,
    event_names: HashMap<i64, Arc<str>>,
}

pub(crate) struct SqliteBackend {
    writer: SqlitePool,
    readers: SqlitePool,
    sql: Statements,
    prefix: String,
    options: StoreOptions,
    types: RwLock<TypeCache>,
    insert_events: Mutex<HashMap<usize, SqlStr>>,
    committed: CommitSignal,
}

impl SqliteBackend {
    pub(crate) async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("invalid SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout)
            .synchronous(match options.synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            });
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let (writer, readers) = if in_memory {
            // Every connection to `:memory:` is its own database: one connection serves all.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(connect)
                .await
                .map_err(backend_error)?;
            (pool.clone(), pool)
        } else {
            let connect = connect.journal_mode(SqliteJournalMode::Wal);
            let writer = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(600))
                .connect_with(connect.clone())
                .await
                .map_err(backend_error)?;
            let readers = SqlitePoolOptions::new()
                .max_connections(options.pool_size)
                .connect_with(connect.read_only(true))
                .await
                .map_err(backend_error)?;
            (writer, readers)
        };
        Ok(SqliteBackend {
            writer,
            readers,
            sql: Statements::new(&options.table_prefix),
            prefix: options.table_prefix.clone(),
            options: options.clone(),
            types: RwLock::new(TypeCache::default()),
            insert_events: Mutex::new(HashMap::new()),
            committed: CommitSignal::default(),
        })
    }

    /// Applies pending migrations in one `BEGIN IMMEDIATE` transaction. A schema newer than
    /// this library is refused before anything is written.
    async fn migrate(&self) -> Result<()> {
        let mut conn = self.writer.acquire().await.map_err(backend_error)?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend_error)?;
        let table = format!("{}schema_migrations", self.prefix);
        let exists = sqlx::query(self.sql.table_exists.clone())
            .bind(&table)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend_error)?
            .is_some();
        let current: i64 = if exists {
            let sql = AssertSqlSafe(format!("SELECT COALESCE(MAX(version), 0) FROM {table}"));
            sqlx::query_scalar(sql)
                .fetch_one(&mut *tx)
                .await
                .map_err(backend_error)?
        } else {
            0
        };
        let pending = plan_migrations(Dialect::Sqlite, current, &self.options, &table)?;
        if pending.is_empty() {
            return Ok(());
        }
        // Each migration records its own version.
        for migration in pending {
            sqlx::raw_sql(AssertSqlSafe(migration.sql))
                .execute(&mut *tx)
                .await
                .map_err(backend_error)?;
            tracing::info!(version = migration.version, "applied SQLite migration");
        }
        tx.commit().await.map_err(backend_error)
    }

    /// Writes every registered type name and caches the ids.
    async fn warm_up(&self, registry: &Registry) -> Result<()> {
        let mut conn = self.writer.acquire().await.map_err(backend_error)?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend_error)?;
        for aggregate in registry.aggregates() {
            sqlx::query(self.sql.insert_aggregate_type.clone())
                .bind(aggregate.name)
                .execute(&mut *tx)
                .await
                .map_err(backend_error)?;
        }
        for event in registry.events() {
            sqlx::query(self.sql.insert_event_type.clone())
                .bind(event.name)
                .execute(&mut *tx)
                .await
                .map_err(backend_error)?;
        }
        tx.commit().await.map_err(backend_error)?;
        self.refresh_types(&mut conn).await
    }

    async fn refresh_types(&self, conn: &mut SqliteConnection) -> Result<()> {
        let aggregates: Vec<(i64, String)> = sqlx::query_as(self.sql.all_aggregate_types.clone())
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        let events: Vec<(i64, String)> = sqlx::query_as(self.sql.all_event_types.clone())
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        let mut types = self.types.write().unwrap_or_else(|e| e.into_inner());
        for (id, name) in aggregates {
            types.aggregate_names.insert(id, Arc::from(name.as_str()));
            types.aggregate_ids.insert(name, id);
        }
        for (id, name) in events {
            types.event_names.insert(id, Arc::from(name.as_str()));
            types.event_ids.insert(name, id);
        }
        Ok(())
    }

    fn cached<T>(&self, f: impl FnOnce(&TypeCache) -> Option<T>) -> Option<T> {
        f(&self.types.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The id of a type name, written on first use by a name the warm-up did not know.
    async fn type_id(
        &self,
        conn: &mut SqliteConnection,
        aggregate: bool,
        name: &str,
    ) -> Result<i64> {
        let lookup = |t: &TypeCache| {
            if aggregate {
                t.aggregate_ids.get(name).copied()
            } else {
                t.event_ids.get(name).copied()
            }
        };
        if let Some(id) = self.cached(lookup) {
            return Ok(id);
        }
        let insert = if aggregate {
            &self.sql.insert_aggregate_type
        } else {
            &self.sql.insert_event_type
        };
        sqlx::query(insert.clone())
            .bind(name)
            .execute(&mut *conn)
            .await
            .map_err(backend_error)?;
        self.refresh_types(conn).await?;
        self.cached(lookup)
            .ok_or_else(|| Error::Corrupt(format!("type {name:?} has no id after insert")))
    }

    /// The name of a type id; re-reads the type tables once for an id written by another
    /// process.
    async fn type_name(&self, aggregate: bool, id: i64) -> Result<Arc<str>> {
        let lookup = |t: &TypeCache| {
            if aggregate {
                t.aggregate_names.get(&id).cloned()
            } else {
                t.event_names.get(&id).cloned()
            }
        };
        if let Some(name) = self.cached(lookup) {
            return Ok(name);
        }
        let mut conn = self.readers.acquire().await.map_err(backend_error)?;
        self.refresh_types(&mut conn).await?;
        self.cached(lookup).ok_or_else(|| {
            let kind = if aggregate { "aggregate" } else { "event" };
            Error::Corrupt(format!("no {kind} type with id {id}"))
        })
    }

    fn insert_events_sql(&self, rows: usize) -> SqlStr {
        let mut cache = self.insert_events.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(rows)
            .or_insert_with(|| {
                let mut sql = self.sql.insert_events_prefix.clone();
                for row in 0..rows {
                    if row > 0 {
                        sql.push(',');
                    }
                    sql.push('(');
                    for column in 0..EVENT_COLUMNS {
                        if column > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&format!("?{}", row * EVENT_COLUMNS + column + 1));
                    }
                    sql.push(')');
                }
                AssertSqlSafe(sql).into_sql_str()
            })
            .clone()
    }

    async fn commit_batch(&self, batch: &CommitBatch) -> Result<()> {
        let mut conn = self.writer.acquire().await.map_err(backend_error)?;
        // Type ids of names first seen now are written outside the commit: a type name is
        // harmless on its own, and the commit transaction stays short.
        let mut aggregate_type_ids = Vec::with_capacity(batch.changes.len());
        for change in &batch.changes {
            aggregate_type_ids.push(self.type_id(&mut conn, true, change.aggregate_type).await?);
        }
        let events = batch.events_in_order();
        let mut event_type_ids = Vec::with_capacity(events.len());
        for (_, event) in &events {
            event_type_ids.push(self.type_id(&mut conn, false, event.name).await?);
        }

        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend_error)?;
        let recorded_at = to_micros(batch.recorded_at);
        for (change, type_id) in batch.changes.iter().zip(aggregate_type_ids) {
            self.claim(&mut tx, change, type_id).await?;
        }
        // All events of the batch, in apply order, in multi-row INSERTs.
        let rows: Vec<_> = events.iter().zip(event_type_ids).collect();
        for chunk in rows.chunks(EVENT_CHUNK) {
            let mut query = sqlx::query(self.insert_events_sql(chunk.len()));
            for ((change, event), event_type_id) in chunk {
                query = query
                    .bind(change.id.as_uuid().as_bytes().as_slice())
                    .bind(to_i64(event.version, "version")?)
                    .bind(*event_type_id)
                    .bind(i64::from(event.schema_version))
                    .bind(event.payload.as_slice())
                    .bind(event.metadata.as_deref())
                    .bind(recorded_at)
                    .bind(event.event_id.as_bytes().as_slice());
            }
            query.execute(&mut *tx).await.map_err(backend_error)?;
        }
        for change in &batch.changes {
            if let Some(snapshot) = &change.snapshot {
                sqlx::query(self.sql.insert_snapshot.clone())
                    .bind(change.id.as_uuid().as_bytes().as_slice())
                    .bind(i64::from(snapshot.snapshot_version))
                    .bind(to_i64(snapshot.version, "version")?)
                    .bind(snapshot.payload.as_slice())
                    .bind(recorded_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(backend_error)?;
            }
        }
        tx.commit().await.map_err(backend_error)?;
        self.committed.notify();
        Ok(())
    }

    /// Inserts a new aggregate's row, or moves an existing one's version from the expected
    /// one: the optimistic check.
    async fn claim(
        &self,
        conn: &mut SqliteConnection,
        change: &Change,
        type_id: i64,
    ) -> Result<()> {
        let id = change.id.as_uuid().as_bytes().as_slice();
        let new_version = to_i64(change.new_version(), "version")?;
        if change.is_new {
            let inserted = sqlx::query(self.sql.insert_aggregate.clone())
                .bind(id)
                .bind(type_id)
                .bind(change.key.as_deref())
                .bind(new_version)
                .execute(&mut *conn)
                .await
                .map_err(backend_error)?
                .rows_affected();
            if inserted == 1 {
                return Ok(());
            }
            return Err(match &change.key {
                Some(key) => Error::KeyTaken {
                    aggregate_type: change.aggregate_type.to_owned(),
                    key: key.clone(),
                },
                None => Error::Conflict {
                    aggregate_type: change.aggregate_type.to_owned(),
                    aggregate: change.id,
                    expected: 0,
                    actual: self.current_version(conn, change.id).await?,
                },
            });
        }
        let updated = sqlx::query(self.sql.cas_version.clone())
            .bind(new_version)
            .bind(id)
            .bind(to_i64(change.expected, "version")?)
            .execute(&mut *conn)
            .await
            .map_err(backend_error)?
            .rows_affected();
        if updated == 1 {
            Ok(())
        } else {
            Err(Error::Conflict {
                aggregate_type: change.aggregate_type.to_owned(),
                aggregate: change.id,
                expected: change.expected,
                actual: self.current_version(conn, change.id).await?,
            })
        }
    }

    async fn current_version(&self, conn: &mut SqliteConnection, id: AggregateId) -> Result<u64> {
        let version: Option<i64> = sqlx::query_scalar(self.sql.current_version.clone())
            .bind(id.as_uuid().as_bytes().as_slice())
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend_error)?;
        to_u64(version.unwrap_or(0), "version")
    }

    async fn fetch_row(
        &self,
        conn: &mut SqliteConnection,
        locate: Locate<'_>,
    ) -> Result<Option<AggregateRow>> {
        let row = match locate {
            Locate::Id(id) => {
                sqlx::query(self.sql.row_by_id.clone())
                    .bind(id.as_uuid().as_bytes().as_slice())
                    .fetch_optional(&mut *conn)
                    .await
            }
            Locate::Key {
                aggregate_type,
                key,
            } => {
                let Some(type_id) = self.cached(|t| t.aggregate_ids.get(aggregate_type).copied())
                else {
                    // A type never written has no aggregates.
                    return Ok(None);
                };
                sqlx::query(self.sql.row_by_key.clone())
                    .bind(type_id)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await
            }
        }
        .map_err(backend_error)?;
        match row {
            Some(row) => self.aggregate_row(&row).await.map(Some),
            None => Ok(None),
        }
    }

    async fn load_stream(&self, request: LoadRequest<'_>) -> Result<Option<LoadedStream>> {
        let mut conn = self.readers.acquire().await.map_err(backend_error)?;
        let Some(row) = self.fetch_row(&mut conn, request.locate).await? else {
            return Ok(None);
        };
        let up_to = request.up_to.map_or(row.version, |v| v.min(row.version));
        let id_bytes = row.id.as_uuid().as_bytes().as_slice();
        let snapshot = match request.snapshot_version {
            Some(shape) => sqlx::query(self.sql.snapshot.clone())
                .bind(id_bytes)
                .bind(i64::from(shape))
                .bind(to_i64(up_to, "version")?)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend_error)?
                .map(|r| {
                    Ok::<_, Error>(StoredSnapshot {
                        version: to_u64(get(&r, 0)?, "snapshot version")?,
                        payload: get(&r, 1)?,
                    })
                })
                .transpose()?,
            None => None,
        };
        let from = snapshot.as_ref().map_or(0, |s| s.version);
        let rows = sqlx::query(self.sql.stream.clone())
            .bind(id_bytes)
            .bind(to_i64(from, "version")?)
            .bind(to_i64(up_to, "version")?)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        let mut events = Vec::with_capacity(rows.len());
        // Runs of one event type are common: look a name up once per run.
        let mut last: Option<(i64, Arc<str>)> = None;
        for r in rows {
            let type_id: i64 = get(&r, 2)?;
            let name = match &last {
                Some((id, name)) if *id == type_id => name.clone(),
                _ => {
                    let name = self.type_name(false, type_id).await?;
                    last = Some((type_id, name.clone()));
                    name
                }
            };
            events.push(StreamEvent {
                version: to_u64(get(&r, 0)?, "sequence")?,
                position: to_u64(get(&r, 1)?, "position")?,
                name,
                schema_version: schema_version(get(&r, 3)?)?,
                payload: get(&r, 4)?,
            });
        }
        Ok(Some(LoadedStream {
            row,
            snapshot,
            events,
        }))
    }

    async fn aggregate_row(&self, row: &SqliteRow) -> Result<AggregateRow> {
        Ok(AggregateRow {
            id: aggregate_id(&get::<Vec<u8>>(row, 0)?)?,
            aggregate_type: self.type_name(true, get(row, 1)?).await?.to_string(),
            key: get(row, 2)?,
            version: to_u64(get(row, 3)?, "version")?,
        })
    }

    async fn recorded(&self, rows: Vec<SqliteRow>) -> Result<Vec<RecordedEvent>> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let position = to_u64(get(&r, 0)?, "position")?;
            let metadata: Option<Vec<u8>> = get(&r, 7)?;
            out.push(RecordedEvent {
                cursor: FeedCursor::at_position(position),
                aggregate_id: aggregate_id(&get::<Vec<u8>>(&r, 1)?)?,
                aggregate_type: self.type_name(true, get(&r, 2)?).await?.to_string(),
                version: to_u64(get(&r, 3)?, "sequence")?,
                event_type: self.type_name(false, get(&r, 4)?).await?.to_string(),
                schema_version: schema_version(get(&r, 5)?)?,
                payload: get(&r, 6)?,
                metadata: Metadata::decode(metadata.as_deref())
                    .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?,
                recorded_at: from_micros(get(&r, 8)?),
                event_id: uuid_from_bytes(
                    &get::<Vec<u8>>(&r, 9)?,
                    &format!("event id at position {position}"),
                )?,
            });
        }
        Ok(out)
    }
}

fn get<T>(row: &SqliteRow, index: usize) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(index).map_err(backend_error)
}

fn schema_version(value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::Corrupt(format!("schema version {value} out of range")))
}

impl Backend for SqliteBackend {
    fn prepare<'a>(&'a self, registry: &'a Registry) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.migrate().await?;
            self.warm_up(registry).await
        })
    }

    fn load<'a>(&'a self, request: LoadRequest<'a>) -> BoxFuture<'a, Result<Option<LoadedStream>>> {
        Box::pin(self.load_stream(request))
    }

    fn locate<'a>(&'a self, locate: Locate<'a>) -> BoxFuture<'a, Result<Option<AggregateRow>>> {
        Box::pin(async move {
            let mut conn = self.readers.acquire().await.map_err(backend_error)?;
            self.fetch_row(&mut conn, locate).await
        })
    }

    fn commit<'a>(&'a self, batch: &'a CommitBatch) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.commit_batch(batch))
    }

    fn read_stream<'a>(
        &'a self,
        id: AggregateId,
        after_version: u64,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>> {
        Box::pin(async move {
            let rows = sqlx::query(self.sql.read_stream.clone())
                .bind(id.as_uuid().as_bytes().as_slice())
                .bind(to_i64(after_version, "version")?)
                .fetch_all(&self.readers)
                .await
                .map_err(backend_error)?;
            self.recorded(rows).await
        })
    }

    fn read_feed<'a>(&'a self, after: FeedCursor, limit: usize) -> BoxFuture<'a, Result<FeedPage>> {
        Box::pin(async move {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = sqlx::query(self.sql.read_feed.clone())
                .bind(to_i64(after.position, "position")?)
                .bind(limit)
                .fetch_all(&self.readers)
                .await
                .map_err(backend_error)?;
            Ok(FeedPage::new(self.recorded(rows).await?, None))
        })
    }

    fn changes(&self) -> u64 {
        self.committed.count()
    }

    fn wait_for_change(&self, since: u64, max_wait: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.committed.wait(since, max_wait))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.writer.close().await;
            self.readers.close().await;
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
