//! The PostgreSQL store (`postgres://…`): many application instances share one database.
//!
//! - A commit is one SQL statement (data-modifying CTEs): compare-and-set of every touched
//!   aggregate, inserts of new aggregates, all events in one `UNNEST` insert and snapshots, every
//!   part conditioned on the version checks. Outside a caller's transaction it runs in
//!   autocommit, so a commit is a single round trip and holds its locks only while that
//!   statement runs.
//! - Events record the writing transaction's id; the global feed is ordered by
//!   `(tx_id, position)` and only reads below the oldest running transaction
//!   (`pg_snapshot_xmin`), so an event whose transaction commits late is never skipped.
//! - `LISTEN`/`NOTIFY` wakes waiters of other processes; polling covers the time the listening
//!   connection is down. PostgreSQL serializes the commits of all transactions that `NOTIFY`
//!   (a database-wide lock held through the commit's WAL flush), which halved the throughput of
//!   concurrent commits in our benchmark: so a commit made through the pool does not notify
//!   itself; a background task sends one `NOTIFY` after it, coalescing the commits made while one
//!   is on its way. A commit inside a caller's transaction notifies within it, since only the
//!   caller knows when it commits.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgExecutor, PgListener, PgPool, PgPoolOptions,
    PgRow,
};
use sqlx::{AssertSqlSafe, Connection, Postgres, Row};
use tracing::Instrument;

use super::{Dialect, backend_error, plan_migrations};
use crate::aggregate::AggregateId;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::metadata::Metadata;
use crate::registry::Registry;
use crate::store::{
    AggregateRow, Backend, BoxFuture, CommitBatch, CommitSignal, LoadRequest, LoadedStream, Locate,
    StoreOptions, StoredSnapshot, StreamEvent, from_micros, to_i64, to_micros, to_u64,
};

/// PostgreSQL cuts identifiers at 63 bytes (NAMEDATALEN - 1), and so channel names.
const MAX_IDENTIFIER: usize = 63;

/// The migration templates, scanned at open for every name they create.
const TEMPLATES: &[&str] = &[include_str!("../../migrations/postgres/0001_initial.sql")];

/// How long a connection may sit idle before it is pinged on checkout: a hot connection is
/// used as is, one that idled long enough for a firewall or a restart to drop it is checked.
const PING_AFTER_IDLE: Duration = Duration::from_secs(30);

/// How long a feed read waits, at most, for transactions still running below events that are
/// already committed, before it returns a shorter page.
const FEED_SETTLE: Duration = Duration::from_secs(1);

/// The shortest interval between two notifications of commits made through one store: a
/// commit after a quiet spell is announced at once, one in a stream at most this much later.
const NOTIFY_WINDOW: Duration = Duration::from_millis(5);

/// The longest pause between two attempts to restore the `LISTEN` connection.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(10);

/// Names derived from the options, all validated identifiers.
#[derive(Debug, Clone)]
struct Names {
    schema: String,
    prefix: String,
    /// The `NOTIFY` channel of this schema and prefix.
    channel: String,
    /// What the migration advisory lock key is hashed from.
    lock_key: String,
}

impl Names {
    fn new(options: &StoreOptions) -> Result<Names> {
        let schema = options
            .schema
            .clone()
            .unwrap_or_else(|| "public".to_owned());
        let prefix = options.table_prefix.clone();
        let channel = format!("{schema}.{prefix}events");
        for template in TEMPLATES {
            for suffix in prefixed_names(template) {
                let name = format!("{prefix}{suffix}");
                if name.len() > MAX_IDENTIFIER {
                    return Err(Error::Config(format!(
                        "table prefix {prefix:?} is too long for PostgreSQL: the name {name:?} \
                         would be {} bytes, over the limit of {MAX_IDENTIFIER}",
                        name.len()
                    )));
                }
            }
        }
        if channel.len() > MAX_IDENTIFIER {
            return Err(Error::Config(format!(
                "schema {schema:?} and table prefix {prefix:?} are too long together for \
                 PostgreSQL: the notification channel {channel:?} would be {} bytes, over the \
                 limit of {MAX_IDENTIFIER}",
                channel.len()
            )));
        }
        let lock_key = format!("annals.migrate:{schema}.{prefix}");
        Ok(Names {
            schema,
            prefix,
            channel,
            lock_key,
        })
    }

    /// `{schema}.{prefix}{table}`.
    fn table(&self, table: &str) -> String {
        format!("{}.{}{}", self.schema, self.prefix, table)
    }
}

/// Every name a template creates with the table prefix, as the part after `{prefix}`.
fn prefixed_names(template: &str) -> impl Iterator<Item = &str> {
    template.split("{prefix}").skip(1).map(|rest| {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        rest.get(..end).unwrap_or_default()
    })
}

/// Which kind of type table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Aggregate,
    Event,
}

/// How a commit checks the versions of the aggregates it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cas {
    /// Only new aggregates.
    None,
    /// One existing aggregate: a plain conditional `UPDATE`.
    One,
    /// Several: locked in id order (so concurrent commits cannot deadlock), checked, then
    /// updated only if every version matches.
    Many,
}

/// The shape of a commit statement; one statement text per shape is rendered at open.
#[derive(Debug, Clone, Copy)]
struct Shape {
    cas: Cas,
    new: bool,
    snapshots: bool,
    /// Inside a caller's transaction: events are stamped with a transaction id no older than
    /// the events they follow (see `commit_sql`).
    in_caller_tx: bool,
}

impl Shape {
    const COUNT: usize = 24;

    fn index(self) -> usize {
        let cas = match self.cas {
            Cas::None => 0,
            Cas::One => 1,
            Cas::Many => 2,
        };
        cas * 8
            + usize::from(self.new) * 4
            + usize::from(self.snapshots) * 2
            + usize::from(self.in_caller_tx)
    }

    fn all() -> impl Iterator<Item = Shape> {
        [Cas::None, Cas::One, Cas::Many]
            .into_iter()
            .flat_map(|cas| {
                (0..8u8).map(move |bits| Shape {
                    cas,
                    new: bits & 4 != 0,
                    snapshots: bits & 2 != 0,
                    in_caller_tx: bits & 1 != 0,
                })
            })
    }
}

/// Numbers bind parameters in the order a statement is written.
struct Params(usize);

impl Params {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("${}", self.0)
    }
}

/// The SQL text of every statement, rendered once at open from validated identifiers.
struct Statements {
    commit: Vec<Arc<str>>,
    /// By id without and with snapshots, then by key without and with snapshots.
    load: [Arc<str>; 4],
    locate_by_id: Arc<str>,
    locate_by_key: Arc<str>,
    versions: Arc<str>,
    read_stream: Arc<str>,
    read_feed: Arc<str>,
    schema_version: Arc<str>,
    notify: Arc<str>,
    ensure_aggregate_types: Arc<str>,
    ensure_event_types: Arc<str>,
    aggregate_types: Arc<str>,
    event_types: Arc<str>,
}

/// The columns of a [`RecordedEvent`], in the order `record` reads them.
const RECORD_COLUMNS: &str = "e.tx_id::text::int8, e.position, e.aggregate_id, a.type_id, \
     e.sequence, e.event_type_id, e.schema_version, e.payload, e.metadata, \
     (EXTRACT(EPOCH FROM e.recorded_at) * 1000000)::int8, e.event_id";

impl Statements {
    fn new(names: &Names) -> Statements {
        let aggregates = names.table("aggregates");
        let events = names.table("events");
        let aggregate_types = names.table("aggregate_types");
        let event_types = names.table("event_types");
        let mut commit = vec![Arc::<str>::from(""); Shape::COUNT];
        for shape in Shape::all() {
            if let Some(slot) = commit.get_mut(shape.index()) {
                *slot = commit_sql(names, shape).into();
            }
        }
        let types = |table: &str| -> Arc<str> { format!("SELECT id, name FROM {table}").into() };
        let ensure = |table: &str| -> Arc<str> {
            format!(
                "INSERT INTO {table} (name) \
                 SELECT n FROM UNNEST($1::text[]) AS n \
                 WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.name = n) \
                 ON CONFLICT DO NOTHING"
            )
            .into()
        };
        Statements {
            commit,
            load: [
                load_sql(names, false, false).into(),
                load_sql(names, false, true).into(),
                load_sql(names, true, false).into(),
                load_sql(names, true, true).into(),
            ],
            locate_by_id: format!(
                "SELECT id, type_id, natural_key, version FROM {aggregates} WHERE id = $1::uuid"
            )
            .into(),
            locate_by_key: format!(
                "SELECT id, type_id, natural_key, version FROM {aggregates} \
                 WHERE type_id = $1::int4 AND natural_key = $2::text"
            )
            .into(),
            versions: format!("SELECT id, version FROM {aggregates} WHERE id = ANY($1::uuid[])")
                .into(),
            read_stream: format!(
                "SELECT {RECORD_COLUMNS} FROM {events} e JOIN {aggregates} a ON a.id = e.aggregate_id \
                 WHERE e.aggregate_id = $1::uuid AND e.sequence > $2::int8 ORDER BY e.sequence"
            )
            .into(),
            // Only below the oldest transaction still running: one that commits later may hold
            // events that sort before the ones already visible. A last row (with no aggregate
            // id) gives the newest event held back above that horizon, if any, read in the
            // same snapshot as the page.
            read_feed: format!(
                "(SELECT {RECORD_COLUMNS} \
                  FROM {events} e JOIN {aggregates} a ON a.id = e.aggregate_id \
                  WHERE (e.tx_id, e.position) > ($1::int8::text::xid8, $2::int8) \
                    AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
                  ORDER BY e.tx_id, e.position LIMIT $3::int8) \
                 UNION ALL \
                 (SELECT e.tx_id::text::int8, e.position, NULL::uuid, NULL::int4, NULL::int8, \
                         NULL::int4, NULL::int4, NULL::bytea, NULL::bytea, NULL::int8, NULL::uuid \
                  FROM {events} e \
                  WHERE (e.tx_id, e.position) > ($1::int8::text::xid8, $2::int8) \
                    AND e.tx_id >= pg_snapshot_xmin(pg_current_snapshot()) \
                  ORDER BY e.tx_id DESC, e.position DESC LIMIT 1)"
            )
            .into(),
            schema_version: format!(
                "SELECT COALESCE(MAX(version), 0) FROM {}",
                names.table("schema_migrations")
            )
            .into(),
            // The notification needs no durability: its transaction commits without waiting for
            // the WAL flush.
            notify: "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1::text, '')"
                .into(),
            ensure_aggregate_types: ensure(&aggregate_types),
            ensure_event_types: ensure(&event_types),
            aggregate_types: types(&aggregate_types),
            event_types: types(&event_types),
        }
    }

    fn commit(&self, shape: Shape) -> Result<Arc<str>> {
        self.commit
            .get(shape.index())
            .cloned()
            .ok_or_else(|| Error::Corrupt(format!("no commit statement for {shape:?}")))
    }
}

/// The statement that loads an aggregate. The first row holds the aggregate and its newest
/// usable snapshot (`position` is NULL); the others are the events after that snapshot, up to
/// the version asked for. Parameters: the id (or the type id and key), the version to read up to
/// (NULL: the latest), and the snapshot shape. The variants without snapshots leave the snapshot
/// table out altogether: a smaller plan is a cheaper one to start on every execution.
fn load_sql(names: &Names, by_key: bool, snapshots: bool) -> String {
    let aggregates = names.table("aggregates");
    let events = names.table("events");
    let snapshots_table = names.table("snapshots");
    // The aggregate's id and bound are compared as scalars (InitPlans), never joined to `a`:
    // the snapshot and event lookups are then index conditions whatever the planner estimates.
    let (filter, up_to, id) = if by_key {
        (
            "type_id = $1::int4 AND natural_key = $2::text",
            "$3",
            "(SELECT id FROM a)",
        )
    } else {
        ("id = $1::uuid", "$2", "$1::uuid")
    };
    let a = format!(
        "a AS (SELECT id, type_id, natural_key, version, \
                      LEAST(version, COALESCE({up_to}::int8, version)) AS up_to \
               FROM {aggregates} WHERE {filter})"
    );
    let events_branch = |after: &str| {
        format!(
            "(SELECT e.position, e.sequence, e.event_type_id, e.schema_version::int8, e.payload, \
                     NULL, NULL \
              FROM {events} e \
              WHERE e.aggregate_id = {id}{after} AND e.sequence <= (SELECT up_to FROM a) \
              ORDER BY e.sequence)"
        )
    };
    if snapshots {
        let shape = if by_key { "$4" } else { "$3" };
        format!(
            "WITH {a}, \
             s AS (SELECT s.version, s.payload FROM {snapshots_table} s \
                   WHERE s.aggregate_id = {id} AND s.snapshot_version = {shape}::int4 \
                     AND s.version <= (SELECT up_to FROM a) \
                   ORDER BY s.version DESC LIMIT 1) \
             SELECT NULL::int8 AS position, a.version AS sequence, a.type_id, s.version AS extra, \
                    s.payload, a.natural_key, a.id \
             FROM a LEFT JOIN s ON true \
             UNION ALL {}",
            events_branch(" AND e.sequence > COALESCE((SELECT version FROM s), 0)")
        )
    } else {
        format!(
            "WITH {a} \
             SELECT NULL::int8 AS position, a.version AS sequence, a.type_id, NULL::int8 AS extra, \
                    NULL::bytea AS payload, a.natural_key, a.id \
             FROM a \
             UNION ALL {}",
            events_branch("")
        )
    }
}

/// The one statement of a commit: the events' `INSERT`, with the version checks, the new
/// aggregates and the snapshots as CTEs before it. Every insert joins the version check (`cas`:
/// one row when the one version matched; `ok`: when all did), so a conflict writes nothing and
/// inserts no event: the commit went through when as many rows were inserted as it has events.
/// Parameters are numbered in this order: the version checks, the new aggregates, the events and
/// the time, the snapshots; `run_commit` binds them in the same order.
fn commit_sql(names: &Names, shape: Shape) -> String {
    let aggregates = names.table("aggregates");
    let events = names.table("events");
    let snapshots = names.table("snapshots");
    let mut p = Params(0);
    let mut ctes: Vec<String> = Vec::new();
    // In a caller's transaction the transaction id may be older than a commit this context
    // loaded from (the caller's transaction can have written before this context loaded):
    // events are then stamped with the newest id among the events they follow, so the feed,
    // ordered by transaction id, keeps each aggregate's events in version order.
    let mut floor = None;
    let gate = match shape.cas {
        Cas::None => "",
        Cas::One => {
            let (id, expected, new_version) = (p.next(), p.next(), p.next());
            ctes.push(format!(
                "cas AS (UPDATE {aggregates} SET version = {new_version}::int8 \
                 WHERE id = {id}::uuid AND version = {expected}::int8 RETURNING id)"
            ));
            if shape.in_caller_tx {
                floor = Some(format!(
                    "floor AS (SELECT tx_id FROM {events} \
                     WHERE aggregate_id = {id}::uuid AND sequence = {expected}::int8)"
                ));
            }
            ", cas"
        }
        Cas::Many => {
            let (ids, expected, new_versions) = (p.next(), p.next(), p.next());
            ctes.push(format!(
                "c AS (SELECT * FROM UNNEST({ids}::uuid[], {expected}::int8[], \
                 {new_versions}::int8[]) AS c (id, expected, new_version))"
            ));
            // Locks are taken in id order before any row changes (so concurrent commits cannot
            // deadlock); the UPDATE then only runs when every version matched, so a conflict
            // leaves every row as it was.
            ctes.push(format!(
                "locked AS (SELECT a.id, a.version FROM {aggregates} a \
                 WHERE a.id = ANY({ids}::uuid[]) ORDER BY a.id FOR NO KEY UPDATE)"
            ));
            ctes.push(
                "ok AS (SELECT true AS ok FROM locked \
                 JOIN c ON c.id = locked.id AND c.expected = locked.version \
                 HAVING count(*) = (SELECT count(*) FROM c))"
                    .to_owned(),
            );
            ctes.push(format!(
                "cas AS (UPDATE {aggregates} a SET version = c.new_version FROM c, ok \
                 WHERE a.id = c.id)"
            ));
            if shape.in_caller_tx {
                floor = Some(format!(
                    "floor AS (SELECT e.tx_id FROM {events} e \
                     JOIN c ON e.aggregate_id = c.id AND e.sequence = c.expected \
                     ORDER BY e.tx_id DESC LIMIT 1)"
                ));
            }
            ", ok"
        }
    };
    if shape.new {
        let (ids, types, keys, versions) = (p.next(), p.next(), p.next(), p.next());
        ctes.push(format!(
            "new_aggregates AS (INSERT INTO {aggregates} (id, type_id, natural_key, version) \
             SELECT n.id, n.type_id, n.natural_key, n.version \
             FROM UNNEST({ids}::uuid[], {types}::int4[], {keys}::text[], {versions}::int8[]) \
                  AS n (id, type_id, natural_key, version){gate})"
        ));
    }
    let (aggregate_ids, sequences, types, schema_versions, payloads, metadata, event_ids) = (
        p.next(),
        p.next(),
        p.next(),
        p.next(),
        p.next(),
        p.next(),
        p.next(),
    );
    let recorded_at = p.next();
    let recorded = format!("TIMESTAMPTZ 'epoch' + {recorded_at}::int8 * INTERVAL '1 microsecond'");
    if shape.snapshots {
        let (ids, shapes, versions, payloads) = (p.next(), p.next(), p.next(), p.next());
        ctes.push(format!(
            "snap AS (INSERT INTO {snapshots} \
                 (aggregate_id, snapshot_version, version, payload, recorded_at) \
             SELECT s.aggregate_id, s.snapshot_version, s.version, s.payload, {recorded} \
             FROM UNNEST({ids}::uuid[], {shapes}::int4[], {versions}::int8[], \
                         {payloads}::bytea[]) AS s (aggregate_id, snapshot_version, version, payload)\
                  {gate} \
             ON CONFLICT DO NOTHING)"
        ));
    }
    let (tx_column, tx_value) = match floor {
        Some(floor) => {
            ctes.push(floor);
            (
                "tx_id, ",
                "GREATEST(pg_current_xact_id(), (SELECT tx_id FROM floor)), ",
            )
        }
        None => ("", ""),
    };
    let with = if ctes.is_empty() {
        String::new()
    } else {
        format!("WITH {} ", ctes.join(", "))
    };
    // WITH ORDINALITY and ORDER BY: positions follow the order the events were applied in.
    format!(
        "{with}INSERT INTO {events} ({tx_column}aggregate_id, sequence, event_type_id, \
             schema_version, payload, metadata, recorded_at, event_id) \
         SELECT {tx_value}e.aggregate_id, e.sequence, e.type_id, e.schema_version, e.payload, \
                e.metadata, {recorded}, e.event_id \
         FROM UNNEST({aggregate_ids}::uuid[], {sequences}::int8[], {types}::int4[], \
                     {schema_versions}::int4[], {payloads}::bytea[], {metadata}::bytea[], \
                     {event_ids}::uuid[]) WITH ORDINALITY \
              AS e (aggregate_id, sequence, type_id, schema_version, payload, metadata, \
                    event_id, ord){gate} \
         ORDER BY e.ord"
    )
}

/// Type names and their ids, both ways.
#[derive(Debug, Default)]
struct TypeMap {
    by_name: HashMap<String, i32>,
    by_id: HashMap<i32, Arc<str>>,
}

/// The cached contents of the two type tables. Readers take a snapshot (`Arc`) and use it
/// without a lock; a miss re-reads the table, which another process may have added to.
#[derive(Debug, Default)]
struct TypeCache {
    aggregates: RwLock<Arc<TypeMap>>,
    events: RwLock<Arc<TypeMap>>,
}

impl TypeCache {
    fn slot(&self, kind: Kind) -> &RwLock<Arc<TypeMap>> {
        match kind {
            Kind::Aggregate => &self.aggregates,
            Kind::Event => &self.events,
        }
    }

    fn get(&self, kind: Kind) -> Arc<TypeMap> {
        let slot = self.slot(kind);
        // The map is replaced whole, never changed in place: a poisoned lock still holds a
        // complete map.
        slot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, kind: Kind, map: TypeMap) {
        let slot = self.slot(kind);
        *slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
    }
}

/// What the background tasks share with waiters and committers.
#[derive(Debug, Default)]
struct Wake {
    /// Fired on every notification, after each (re)connection of the listener, and after every
    /// commit made through this store.
    changed: CommitSignal,
    /// Asks the notifier task for a `NOTIFY`; a permit left while one is on its way makes one
    /// more, so every commit is followed by a notification.
    commits: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Tasks {
    listener: Option<tokio::task::JoinHandle<()>>,
    notifier: Option<tokio::task::JoinHandle<()>>,
    closed: bool,
}

/// The PostgreSQL backend.
pub(crate) struct PostgresBackend {
    pool: PgPool,
    /// One connection for `LISTEN`, apart from the pool so it never takes a worker's place.
    listener_pool: PgPool,
    names: Names,
    sql: Statements,
    options: StoreOptions,
    types: TypeCache,
    wake: Arc<Wake>,
    tasks: Mutex<Tasks>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("schema", &self.names.schema)
            .field("prefix", &self.names.prefix)
            .finish_non_exhaustive()
    }
}

fn query(sql: &Arc<str>) -> sqlx::query::Query<'static, Postgres, PgArguments> {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

impl PostgresBackend {
    /// Connects (one connection at once, so a wrong URL fails here) and renders the statements.
    pub(crate) async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let names = Names::new(options)?;
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size)
            .min_connections(0)
            // A ping on every checkout costs a round trip per operation; only connections that
            // sat idle long enough to have been dropped are checked.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect.clone())
            .await
            .map_err(backend_error)?;
        // Acquired only to (re)connect the listener: the ping on checkout costs nothing there,
        // and keeps a connection that died with an error from being handed back.
        let listener_pool = PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(true)
            .connect_lazy_with(connect);
        let sql = Statements::new(&names);
        let wake = Arc::new(Wake::default());
        let notifier = tokio::spawn(notify_commits(
            pool.clone(),
            sql.notify.clone(),
            names.channel.clone(),
            wake.clone(),
        ));
        Ok(PostgresBackend {
            pool,
            listener_pool,
            sql,
            names,
            options: options.clone(),
            types: TypeCache::default(),
            wake,
            tasks: Mutex::new(Tasks {
                notifier: Some(notifier),
                ..Tasks::default()
            }),
        })
    }

    /// Brings the schema to the current version, in one transaction under an advisory lock, so
    /// several instances starting at once migrate exactly once. A schema newer than this
    /// library is refused before anything is written.
    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(backend_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
            .bind(&self.names.lock_key)
            .execute(&mut *tx)
            .await
            .map_err(backend_error)?;
        let table = self.names.table("schema_migrations");
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1::text) IS NOT NULL")
            .bind(&table)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend_error)?;
        let current: i64 = if exists {
            sqlx::query_scalar(AssertSqlSafe(self.sql.schema_version.clone()))
                .fetch_one(&mut *tx)
                .await
                .map_err(backend_error)?
        } else {
            0
        };
        let pending = plan_migrations(Dialect::Postgres, current, &self.options, &table)?;
        if pending.is_empty() {
            return Ok(());
        }
        for migration in pending {
            sqlx::raw_sql(AssertSqlSafe(migration.sql))
                .execute(&mut *tx)
                .await
                .map_err(backend_error)?;
            tracing::info!(
                version = migration.version,
                schema = %self.names.schema,
                prefix = %self.names.prefix,
                "applied PostgreSQL migration"
            );
        }
        tx.commit().await.map_err(backend_error)
    }

    /// Writes every registered type name and caches the ids.
    async fn warm_up(&self, registry: &Registry) -> Result<()> {
        let aggregates: Vec<&str> = registry.aggregates().iter().map(|a| a.name).collect();
        let events: Vec<&str> = registry.events().iter().map(|e| e.name).collect();
        self.ensure_types(Kind::Aggregate, &aggregates).await?;
        self.ensure_types(Kind::Event, &events).await
    }

    /// Inserts the names that are missing, then re-reads the table.
    async fn ensure_types(&self, kind: Kind, names: &[&str]) -> Result<()> {
        let sql = match kind {
            Kind::Aggregate => &self.sql.ensure_aggregate_types,
            Kind::Event => &self.sql.ensure_event_types,
        };
        let unique: Vec<&str> = {
            let mut seen = HashSet::new();
            names.iter().copied().filter(|n| seen.insert(*n)).collect()
        };
        if !unique.is_empty() {
            query(sql)
                .bind(unique)
                .execute(&self.pool)
                .await
                .map_err(backend_error)?;
        }
        self.refresh_types(kind).await.map(drop)
    }

    async fn refresh_types(&self, kind: Kind) -> Result<Arc<TypeMap>> {
        let sql = match kind {
            Kind::Aggregate => &self.sql.aggregate_types,
            Kind::Event => &self.sql.event_types,
        };
        let rows: Vec<(i32, String)> = sqlx::query_as(AssertSqlSafe(sql.clone()))
            .fetch_all(&self.pool)
            .await
            .map_err(backend_error)?;
        let mut map = TypeMap::default();
        for (id, name) in rows {
            map.by_name.insert(name.clone(), id);
            map.by_id.insert(id, Arc::from(name));
        }
        self.types.set(kind, map);
        Ok(self.types.get(kind))
    }

    /// The type map, re-read when it lacks `id`: another process may have added that type.
    async fn types_with_ids(
        &self,
        kind: Kind,
        ids: impl Iterator<Item = i32>,
    ) -> Result<Arc<TypeMap>> {
        let map = self.types.get(kind);
        let mut ids = ids;
        if ids.all(|id| map.by_id.contains_key(&id)) {
            Ok(map)
        } else {
            self.refresh_types(kind).await
        }
    }

    /// The id of a type name, written to the table first when no process has yet.
    async fn type_id(&self, kind: Kind, name: &str) -> Result<i32> {
        if let Some(&id) = self.types.get(kind).by_name.get(name) {
            return Ok(id);
        }
        self.ensure_types(kind, &[name]).await?;
        self.types
            .get(kind)
            .by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::Corrupt(format!("type {name:?} is missing after insert")))
    }

    /// The id of a type name if it is in the table (for lookups: reads never write types).
    async fn known_type_id(&self, kind: Kind, name: &str) -> Result<Option<i32>> {
        if let Some(&id) = self.types.get(kind).by_name.get(name) {
            return Ok(Some(id));
        }
        Ok(self.refresh_types(kind).await?.by_name.get(name).copied())
    }

    fn aggregate_row(&self, row: &PgRow, types: &TypeMap, base: usize) -> Result<AggregateRow> {
        let id: uuid::Uuid = get(row, base)?;
        let type_id: i32 = get(row, base + 1)?;
        let key: Option<String> = get(row, base + 2)?;
        let version: i64 = get(row, base + 3)?;
        Ok(AggregateRow {
            id: id.into(),
            aggregate_type: type_name(types, Kind::Aggregate, type_id)?.to_string(),
            key,
            version: to_u64(version, "aggregate version")?,
        })
    }

    /// Turns rows of [`RECORD_COLUMNS`] into records.
    async fn records(&self, rows: Vec<PgRow>) -> Result<Vec<RecordedEvent>> {
        let aggregate_types = self.types.get(Kind::Aggregate);
        let event_types = self.types.get(Kind::Event);
        let mut missing = Vec::new();
        let mut records = Vec::with_capacity(rows.len());
        for (index, row) in rows.iter().enumerate() {
            let (record, aggregate_type, event_type) = record(row)?;
            let mut record = record;
            match aggregate_types.by_id.get(&aggregate_type) {
                Some(name) => record.aggregate_type = name.to_string(),
                None => missing.push((index, Kind::Aggregate, aggregate_type)),
            }
            match event_types.by_id.get(&event_type) {
                Some(name) => record.event_type = name.to_string(),
                None => missing.push((index, Kind::Event, event_type)),
            }
            records.push(record);
        }
        // A type id this process has not seen: another process wrote that type.
        for (index, kind, id) in missing {
            let map = self.types_with_ids(kind, std::iter::once(id)).await?;
            let name = type_name(&map, kind, id)?;
            if let Some(record) = records.get_mut(index) {
                match kind {
                    Kind::Aggregate => record.aggregate_type = name.to_string(),
                    Kind::Event => record.event_type = name.to_string(),
                }
            }
        }
        Ok(records)
    }

    /// One page of the feed after `after`, and the newest event after it that is committed but
    /// not readable yet (a transaction older than its own is still running).
    async fn feed_page(
        &self,
        after: FeedCursor,
        limit: i64,
    ) -> Result<(Vec<RecordedEvent>, Option<FeedCursor>)> {
        let mut rows = query(&self.sql.read_feed)
            .bind(to_i64(after.tx, "feed cursor transaction")?)
            .bind(to_i64(after.position, "feed cursor position")?)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(backend_error)?;
        let mut held = None;
        if let Some(last) = rows.last()
            && get::<Option<uuid::Uuid>>(last, 2)?.is_none()
        {
            held = Some(FeedCursor {
                tx: to_u64(get(last, 0)?, "transaction id")?,
                position: to_u64(get(last, 1)?, "event position")?,
            });
            rows.pop();
        }
        Ok((self.records(rows).await?, held))
    }

    /// Runs the commit statement of `batch` on `executor`: the pool (autocommit) or a caller's
    /// connection inside its transaction.
    async fn run_commit<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        batch: &CommitBatch,
        in_caller_tx: bool,
    ) -> Result<()> {
        let args = self.commit_args(batch).await?;
        let shape = Shape {
            cas: match args.cas_ids.len() {
                0 => Cas::None,
                1 => Cas::One,
                _ => Cas::Many,
            },
            new: !args.new_ids.is_empty(),
            snapshots: !args.snap_ids.is_empty(),
            in_caller_tx,
        };
        let sql = self.sql.commit(shape)?;
        let event_count = args.ev_ids.len() as u64;
        let mut q = query(&sql);
        match shape.cas {
            Cas::None => {}
            Cas::One => {
                if let (Some(id), Some(expected), Some(new_version)) = (
                    args.cas_ids.first(),
                    args.cas_expected.first(),
                    args.cas_new.first(),
                ) {
                    q = q.bind(*id).bind(*expected).bind(*new_version);
                }
            }
            Cas::Many => {
                q = q
                    .bind(args.cas_ids)
                    .bind(args.cas_expected)
                    .bind(args.cas_new);
            }
        }
        if shape.new {
            q = q
                .bind(args.new_ids)
                .bind(args.new_types)
                .bind(args.new_keys)
                .bind(args.new_versions);
        }
        q = q
            .bind(args.ev_aggregates)
            .bind(args.ev_sequences)
            .bind(args.ev_types)
            .bind(args.ev_schema_versions)
            .bind(args.ev_payloads)
            .bind(args.ev_metadata)
            .bind(args.ev_ids)
            .bind(to_micros(batch.recorded_at));
        if shape.snapshots {
            q = q
                .bind(args.snap_ids)
                .bind(args.snap_shapes)
                .bind(args.snap_versions)
                .bind(args.snap_payloads);
        }
        match q.execute(executor).await {
            Ok(done) if done.rows_affected() == event_count => {
                if !in_caller_tx {
                    self.wake.changed.notify();
                    self.wake.commits.notify_one();
                }
                Ok(())
            }
            Ok(_) => Err(self.conflict(batch, None).await),
            Err(e) => Err(self.commit_error(batch, e).await),
        }
    }

    /// The bind arrays of a commit, with type names turned into ids.
    async fn commit_args<'a>(&self, batch: &'a CommitBatch) -> Result<CommitArgs<'a>> {
        let mut events_map = self.types.get(Kind::Event);
        let mut aggregates_map = self.types.get(Kind::Aggregate);
        // Types outside the registry (hand-written aggregates) are written on first use.
        for change in &batch.changes {
            if change.is_new && !aggregates_map.by_name.contains_key(change.aggregate_type) {
                self.type_id(Kind::Aggregate, change.aggregate_type).await?;
                aggregates_map = self.types.get(Kind::Aggregate);
            }
            for event in &change.events {
                if !events_map.by_name.contains_key(event.name) {
                    self.type_id(Kind::Event, event.name).await?;
                    events_map = self.types.get(Kind::Event);
                }
            }
        }
        let lookup = |map: &TypeMap, name: &str| {
            map.by_name
                .get(name)
                .copied()
                .ok_or_else(|| Error::Corrupt(format!("type {name:?} has no id")))
        };
        let count = batch.event_count();
        let mut args = CommitArgs::with_capacity(count);
        for change in &batch.changes {
            let id = *change.id.as_uuid();
            if change.is_new {
                args.new_ids.push(id);
                args.new_types
                    .push(lookup(&aggregates_map, change.aggregate_type)?);
                args.new_keys.push(change.key.as_deref());
                args.new_versions
                    .push(to_i64(change.new_version(), "aggregate version")?);
            } else {
                args.cas_ids.push(id);
                args.cas_expected
                    .push(to_i64(change.expected, "aggregate version")?);
                args.cas_new
                    .push(to_i64(change.new_version(), "aggregate version")?);
            }
            if let Some(snapshot) = &change.snapshot {
                args.snap_ids.push(id);
                args.snap_shapes
                    .push(to_i32(snapshot.snapshot_version, "snapshot version")?);
                args.snap_versions
                    .push(to_i64(snapshot.version, "snapshot version")?);
                args.snap_payloads.push(&snapshot.payload);
            }
        }
        // In the order the context applied them, across aggregates: the order of the feed.
        for (change, event) in batch.events_in_order() {
            args.ev_aggregates.push(*change.id.as_uuid());
            args.ev_sequences
                .push(to_i64(event.version, "event version")?);
            args.ev_types.push(lookup(&events_map, event.name)?);
            args.ev_schema_versions
                .push(to_i32(event.schema_version, "schema version")?);
            args.ev_payloads.push(&event.payload);
            args.ev_metadata.push(event.metadata.as_deref());
            args.ev_ids.push(event.event_id);
        }
        Ok(args)
    }

    /// The conflict behind a failed version check: the first changed aggregate whose version is
    /// not the one expected (`hint`: the aggregate the database named, if any).
    async fn conflict(&self, batch: &CommitBatch, hint: Option<AggregateId>) -> Error {
        let ids: Vec<uuid::Uuid> = batch.changes.iter().map(|c| *c.id.as_uuid()).collect();
        let rows: Vec<(uuid::Uuid, i64)> =
            match sqlx::query_as(AssertSqlSafe(self.sql.versions.clone()))
                .bind(ids)
                .fetch_all(&self.pool)
                .await
            {
                Ok(rows) => rows,
                Err(e) => return backend_error(e),
            };
        let actual: HashMap<uuid::Uuid, i64> = rows.into_iter().collect();
        let version_of = |id: &AggregateId| {
            actual
                .get(id.as_uuid())
                .map_or(0, |v| u64::try_from(*v).unwrap_or(0))
        };
        let moved = batch.changes.iter().find(|c| {
            hint.is_none_or(|h| h == c.id)
                && (if c.is_new {
                    actual.contains_key(c.id.as_uuid())
                } else {
                    version_of(&c.id) != c.expected
                })
        });
        // A serialization failure or deadlock can be reported before the version moved; the
        // first existing aggregate is then named, with the version as it stands.
        let change = moved.or_else(|| batch.changes.iter().find(|c| !c.is_new));
        match change {
            Some(c) => {
                tracing::debug!(aggregate = %c.id, expected = c.expected, "commit conflict");
                Error::Conflict {
                    aggregate_type: c.aggregate_type.to_owned(),
                    aggregate: c.id,
                    expected: c.expected,
                    actual: version_of(&c.id),
                }
            }
            None => Error::Corrupt("a commit conflicted, but no aggregate moved".to_owned()),
        }
    }

    /// Maps a failed commit statement to the error a caller can act on.
    async fn commit_error(&self, batch: &CommitBatch, e: sqlx::Error) -> Error {
        let (code, constraint) = match e.as_database_error() {
            Some(db) => (
                db.code().map(|c| c.into_owned()),
                db.constraint().map(str::to_owned),
            ),
            None => (None, None),
        };
        let prefix = &self.names.prefix;
        match (code.as_deref(), constraint.as_deref()) {
            (Some("23505"), Some(c)) if c == format!("{prefix}aggregates_key_uq") => {
                self.key_taken(batch).await
            }
            (Some("23505"), Some(c)) if c == format!("{prefix}aggregates_pk") => {
                let new = batch.changes.iter().find(|c| c.is_new).map(|c| c.id);
                self.conflict(batch, new).await
            }
            (Some("23505"), Some(c)) if c == format!("{prefix}events_event_id_uq") => {
                Error::Corrupt(format!("an event id of this commit is already stored: {e}"))
            }
            (Some("23505"), Some(c)) if c == format!("{prefix}events_stream_uq") => {
                Error::Corrupt(format!(
                    "an aggregate's row is behind its events (the version check passed, the \
                     event sequence is taken): {e}"
                ))
            }
            // Inside a caller's REPEATABLE READ or SERIALIZABLE transaction, an aggregate
            // changed since its snapshot fails this way; re-running the work resolves both.
            (Some("40001" | "40P01"), _) if batch.changes.iter().any(|c| !c.is_new) => {
                self.conflict(batch, None).await
            }
            _ => backend_error(e),
        }
    }

    /// The key error of a commit whose new aggregate's key was taken meanwhile.
    async fn key_taken(&self, batch: &CommitBatch) -> Error {
        let keyed: Vec<(&'static str, &str)> = batch
            .changes
            .iter()
            .filter(|c| c.is_new)
            .filter_map(|c| c.key.as_deref().map(|k| (c.aggregate_type, k)))
            .collect();
        let mut taken = keyed.first().copied();
        if keyed.len() > 1 {
            for &(aggregate_type, key) in &keyed {
                let locate = Locate::Key {
                    aggregate_type,
                    key,
                };
                if let Ok(Some(_)) = self.locate_row(locate).await {
                    taken = Some((aggregate_type, key));
                    break;
                }
            }
        }
        match taken {
            Some((aggregate_type, key)) => Error::KeyTaken {
                aggregate_type: aggregate_type.to_owned(),
                key: key.to_owned(),
            },
            None => Error::Corrupt("a key clash without a keyed aggregate".to_owned()),
        }
    }

    async fn locate_row(&self, locate: Locate<'_>) -> Result<Option<AggregateRow>> {
        let row = match locate {
            Locate::Id(id) => query(&self.sql.locate_by_id)
                .bind(*id.as_uuid())
                .fetch_optional(&self.pool)
                .await
                .map_err(backend_error)?,
            Locate::Key {
                aggregate_type,
                key,
            } => {
                let Some(type_id) = self.known_type_id(Kind::Aggregate, aggregate_type).await?
                else {
                    return Ok(None);
                };
                query(&self.sql.locate_by_key)
                    .bind(type_id)
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(backend_error)?
            }
        };
        let Some(row) = row else {
            return Ok(None);
        };
        let type_id: i32 = get(&row, 1)?;
        let types = self
            .types_with_ids(Kind::Aggregate, std::iter::once(type_id))
            .await?;
        self.aggregate_row(&row, &types, 0).map(Some)
    }

    async fn load_stream(&self, request: LoadRequest<'_>) -> Result<Option<LoadedStream>> {
        let snapshot_version = request
            .snapshot_version
            .map(|v| to_i32(v, "snapshot version"))
            .transpose()?;
        let up_to = request
            .up_to
            .map(|v| to_i64(v, "aggregate version"))
            .transpose()?;
        let with_snapshots = usize::from(snapshot_version.is_some());
        let rows = match request.locate {
            Locate::Id(id) => {
                let sql = self.sql.load.get(with_snapshots).ok_or_else(no_statement)?;
                let mut q = query(sql).bind(*id.as_uuid()).bind(up_to);
                if let Some(shape) = snapshot_version {
                    q = q.bind(shape);
                }
                q.fetch_all(&self.pool).await.map_err(backend_error)?
            }
            Locate::Key {
                aggregate_type,
                key,
            } => {
                let Some(type_id) = self.known_type_id(Kind::Aggregate, aggregate_type).await?
                else {
                    return Ok(None);
                };
                let sql = self
                    .sql
                    .load
                    .get(2 + with_snapshots)
                    .ok_or_else(no_statement)?;
                let mut q = query(sql).bind(type_id).bind(key).bind(up_to);
                if let Some(shape) = snapshot_version {
                    q = q.bind(shape);
                }
                q.fetch_all(&self.pool).await.map_err(backend_error)?
            }
        };
        if rows.is_empty() {
            return Ok(None);
        }
        let event_types = self.types.get(Kind::Event);
        let mut header = None;
        let mut missing = Vec::new();
        let mut events = Vec::with_capacity(rows.len().saturating_sub(1));
        for row in &rows {
            let Some(position) = get::<Option<i64>>(row, 0)? else {
                header = Some(row);
                continue;
            };
            let type_id: i32 = get(row, 2)?;
            let schema_version: i64 = get(row, 3)?;
            let name = match event_types.by_id.get(&type_id) {
                Some(name) => name.clone(),
                None => {
                    missing.push((events.len(), type_id));
                    Arc::from("")
                }
            };
            events.push(StreamEvent {
                version: to_u64(get(row, 1)?, "event version")?,
                position: to_u64(position, "event position")?,
                name,
                schema_version: u32::try_from(schema_version).map_err(|_| {
                    Error::Corrupt(format!(
                        "schema version {schema_version} at position {position}"
                    ))
                })?,
                payload: get(row, 4)?,
            });
        }
        // An event type this process has not seen: another process wrote it.
        for (index, type_id) in missing {
            let map = self
                .types_with_ids(Kind::Event, std::iter::once(type_id))
                .await?;
            if let Some(event) = events.get_mut(index) {
                event.name = type_name(&map, Kind::Event, type_id)?;
            }
        }
        let Some(header) = header else {
            return Err(Error::Corrupt(
                "events were read for an aggregate without its row".to_owned(),
            ));
        };
        // The events come ordered from the statement; sorting is only a guard.
        if !events.windows(2).all(|w| match w {
            [a, b] => a.version < b.version,
            _ => true,
        }) {
            events.sort_by_key(|e| e.version);
        }
        let type_id: i32 = get(header, 2)?;
        let aggregate_types = self
            .types_with_ids(Kind::Aggregate, std::iter::once(type_id))
            .await?;
        let id: uuid::Uuid = get(header, 6)?;
        let row = AggregateRow {
            id: id.into(),
            aggregate_type: type_name(&aggregate_types, Kind::Aggregate, type_id)?.to_string(),
            key: get(header, 5)?,
            version: to_u64(get(header, 1)?, "aggregate version")?,
        };
        let snapshot = match get::<Option<i64>>(header, 3)? {
            Some(version) => Some(StoredSnapshot {
                version: to_u64(version, "snapshot version")?,
                payload: get(header, 4)?,
            }),
            None => None,
        };
        Ok(Some(LoadedStream {
            row,
            snapshot,
            events,
        }))
    }

    /// Starts the `LISTEN` task unless it runs or the store is closed.
    fn start_listener(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.closed || tasks.listener.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        tasks.listener = Some(tokio::spawn(listen(
            self.listener_pool.clone(),
            self.names.channel.clone(),
            self.wake.clone(),
        )));
    }

    /// Commits `batch` on the caller's connection, inside whatever transaction it has open.
    /// The notification is sent in that transaction too: it is delivered when (and if) the
    /// caller commits.
    async fn commit_in(&self, conn: &mut PgConnection, batch: &CommitBatch) -> Result<()> {
        self.run_commit(&mut *conn, batch, true).await?;
        sqlx::query("SELECT pg_notify($1::text, '')")
            .bind(self.names.channel.as_str())
            .execute(&mut *conn)
            .await
            .map_err(backend_error)?;
        Ok(())
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        for task in [tasks.listener.take(), tasks.notifier.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// Keeps one connection listening on `channel` and wakes waiters on every notification. While
/// it is down, waiters wait out their poll interval; after every reconnection they are woken,
/// since commits made meanwhile sent notifications nobody received.
async fn listen(pool: PgPool, channel: String, wake: Arc<Wake>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match subscribe(&pool, &channel).await {
            Ok(mut listener) => {
                tracing::debug!(%channel, "listening for commits");
                wake.changed.notify();
                backoff = Duration::from_millis(100);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => wake.changed.notify(),
                        Ok(None) => {
                            tracing::warn!(%channel, "lost the LISTEN connection; polling until it is back");
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%channel, %error, "LISTEN failed; polling until it is back");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%channel, %error, "cannot LISTEN; polling until it can");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
    }
}

/// Sends a `NOTIFY` after commits made through this store, one for all the commits made while
/// the previous one was on its way. A lost notification only delays other processes' readers
/// until their next poll.
async fn notify_commits(pool: PgPool, sql: Arc<str>, channel: String, wake: Arc<Wake>) {
    loop {
        wake.commits.notified().await;
        if let Err(error) = query(&sql).bind(channel.as_str()).execute(&pool).await {
            tracing::debug!(%channel, %error, "NOTIFY failed; other processes will poll");
        }
        // Under a stream of commits, one notification per window: a NOTIFY is a transaction of
        // its own, and the commits it would announce are already covered by the next one.
        tokio::time::sleep(NOTIFY_WINDOW).await;
    }
}

async fn subscribe(pool: &PgPool, channel: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnection is this task's own loop, which also wakes waiters after it.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    Ok(listener)
}

/// The bind arrays of one commit.
#[derive(Default)]
struct CommitArgs<'a> {
    cas_ids: Vec<uuid::Uuid>,
    cas_expected: Vec<i64>,
    cas_new: Vec<i64>,
    new_ids: Vec<uuid::Uuid>,
    new_types: Vec<i32>,
    new_keys: Vec<Option<&'a str>>,
    new_versions: Vec<i64>,
    ev_aggregates: Vec<uuid::Uuid>,
    ev_sequences: Vec<i64>,
    ev_types: Vec<i32>,
    ev_schema_versions: Vec<i32>,
    ev_payloads: Vec<&'a [u8]>,
    ev_metadata: Vec<Option<&'a [u8]>>,
    ev_ids: Vec<uuid::Uuid>,
    snap_ids: Vec<uuid::Uuid>,
    snap_shapes: Vec<i32>,
    snap_versions: Vec<i64>,
    snap_payloads: Vec<&'a [u8]>,
}

impl CommitArgs<'_> {
    fn with_capacity(events: usize) -> Self {
        CommitArgs {
            ev_aggregates: Vec::with_capacity(events),
            ev_sequences: Vec::with_capacity(events),
            ev_types: Vec::with_capacity(events),
            ev_schema_versions: Vec::with_capacity(events),
            ev_payloads: Vec::with_capacity(events),
            ev_metadata: Vec::with_capacity(events),
            ev_ids: Vec::with_capacity(events),
            ..CommitArgs::default()
        }
    }
}

/// Decodes one column. Every column of every statement here has an explicit SQL type, so the
/// per-call type check of `try_get` is skipped (it is a tenth of the cost of a large load); a
/// value that does not decode is still an error.
fn get<'r, T>(row: &'r PgRow, index: usize) -> Result<T>
where
    T: sqlx::Decode<'r, Postgres>,
{
    row.try_get_unchecked(index).map_err(backend_error)
}

fn no_statement() -> Error {
    Error::Corrupt("a statement is missing from the rendered set".to_owned())
}

fn to_i32(value: u32, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::Config(format!("{what} {value} is out of range")))
}

fn type_name(map: &TypeMap, kind: Kind, id: i32) -> Result<Arc<str>> {
    map.by_id.get(&id).cloned().ok_or_else(|| {
        let table = match kind {
            Kind::Aggregate => "aggregate",
            Kind::Event => "event",
        };
        Error::Corrupt(format!(
            "{table} type id {id} is not in the {table} type table"
        ))
    })
}

/// One row of [`RECORD_COLUMNS`] as a record, its type names left empty, with the type ids
/// (aggregate, event) to name them by.
fn record(row: &PgRow) -> Result<(RecordedEvent, i32, i32)> {
    let tx: i64 = get(row, 0)?;
    let position: i64 = get(row, 1)?;
    let position = to_u64(position, "event position")?;
    let aggregate_id: uuid::Uuid = get(row, 2)?;
    let schema_version: i32 = get(row, 6)?;
    let metadata: Option<&[u8]> = get(row, 8)?;
    let record = RecordedEvent {
        cursor: FeedCursor {
            tx: to_u64(tx, "transaction id")?,
            position,
        },
        aggregate_id: aggregate_id.into(),
        aggregate_type: String::new(),
        version: to_u64(get(row, 4)?, "event version")?,
        event_type: String::new(),
        schema_version: u32::try_from(schema_version).map_err(|_| {
            Error::Corrupt(format!(
                "schema version {schema_version} at position {position}"
            ))
        })?,
        payload: get(row, 7)?,
        event_id: get(row, 10)?,
        recorded_at: from_micros(get(row, 9)?),
        metadata: Metadata::decode(metadata)
            .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?,
    };
    Ok((record, get(row, 3)?, get(row, 5)?))
}

impl Backend for PostgresBackend {
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
        Box::pin(self.locate_row(locate))
    }

    fn commit<'a>(&'a self, batch: &'a CommitBatch) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run_commit(&self.pool, batch, false))
    }

    fn read_stream<'a>(
        &'a self,
        id: AggregateId,
        after_version: u64,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>> {
        Box::pin(async move {
            let rows = query(&self.sql.read_stream)
                .bind(*id.as_uuid())
                .bind(to_i64(after_version, "aggregate version")?)
                .fetch_all(&self.pool)
                .await
                .map_err(backend_error)?;
            self.records(rows).await
        })
    }

    fn read_feed<'a>(
        &'a self,
        after: FeedCursor,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
            let deadline = tokio::time::Instant::now() + FEED_SETTLE;
            let mut pause = Duration::from_millis(1);
            // Committed events past a transaction that is still running are held back; when a
            // page comes out short because of them, wait a little for that transaction to end
            // (commits take milliseconds), so readers see their own and others' recent commits.
            let mut target = None;
            loop {
                let (page, held) = self.feed_page(after, limit_sql).await?;
                if page.len() >= limit {
                    return Ok(page);
                }
                // Wait for the events held back at the first look, not for later ones: under a
                // stream of commits there is always a newer one.
                let Some(wanted) = target.or(held) else {
                    return Ok(page);
                };
                let done = held.is_none() || page.last().is_some_and(|e| e.cursor >= wanted);
                if done || tokio::time::Instant::now() >= deadline {
                    return Ok(page);
                }
                target = Some(wanted);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        })
    }

    fn changes(&self) -> u64 {
        // The first waiter starts the listener; its first wake-up (sent once it listens)
        // moves the counter past what that waiter read.
        self.start_listener();
        self.wake.changed.count()
    }

    fn wait_for_change(&self, since: u64, max_wait: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.wake.changed.wait(since, max_wait))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let running = {
                let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
                tasks.closed = true;
                [tasks.listener.take(), tasks.notifier.take()]
            };
            for task in running.into_iter().flatten() {
                task.abort();
                let _ = task.await;
            }
            self.listener_pool.close().await;
            self.pool.close().await;
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Context {
    /// Commits this context inside the caller's own PostgreSQL transaction, so the domain
    /// events and the caller's own writes commit together, or not at all.
    ///
    /// Pass the connection of an open transaction (`&mut *tx` for a
    /// `sqlx::Transaction<'_, Postgres>`); the events become visible, and waiters are notified,
    /// when that transaction commits. The version checks are the same as [`Context::commit`]'s
    /// and fail with [`Error::Conflict`] or [`Error::KeyTaken`]; after any error, roll the
    /// transaction back (a key clash aborts it on the server anyway) and re-run the work.
    ///
    /// The connection must be to the store's database. A long-open transaction holds back
    /// readers of the global feed (see [`Store::read_feed`](crate::Store::read_feed)) until it
    /// ends: keep it short. Fails with [`Error::Config`] on a store that is not PostgreSQL.
    ///
    /// ```no_run
    /// use annals::prelude::*;
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Event, Serialize, Deserialize)]
    /// struct Placed { total: i64 }
    ///
    /// #[derive(Aggregate, Serialize, Deserialize, Default)]
    /// #[aggregate(name = "order", events(Placed))]
    /// struct Order { total: i64 }
    ///
    /// impl Apply<Placed> for Order {
    ///     fn apply(&mut self, e: &Placed) { self.total = e.total }
    /// }
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let url = "postgres://app@localhost/shop";
    /// let store = Store::open(url).await?;
    /// let pool = sqlx::PgPool::connect(url).await?;
    ///
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO invoices (number, total) VALUES ($1, $2)")
    ///     .bind("INV-7")
    ///     .bind(120_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// let mut ctx = store.begin();
    /// let mut order = ctx.create_with_key::<Order>("order-7").await?;
    /// ctx.apply(&mut order, Placed { total: 120 })?;
    /// ctx.commit_in(&mut tx).await?; // staged in `tx`, not yet visible
    /// tx.commit().await?; // the invoice and the order's events, together
    /// # Ok(()) }
    /// ```
    pub async fn commit_in(self, conn: &mut PgConnection) -> Result<()> {
        let Some((store, batch)) = self.into_batch() else {
            return Ok(());
        };
        let Some(backend) = store
            .inner
            .backend
            .as_any()
            .downcast_ref::<PostgresBackend>()
        else {
            return Err(Error::Config(
                "commit_in needs a PostgreSQL store (postgres://…)".to_owned(),
            ));
        };
        let span = tracing::debug_span!(
            "annals.commit",
            aggregates = batch.changes.len(),
            events = batch.event_count(),
            in_caller_tx = true,
        );
        backend.commit_in(conn, &batch).instrument(span).await
    }
}
