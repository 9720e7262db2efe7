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

mod commit;
mod feed;
mod load;
mod migrate;
mod names;
mod notify;
mod render;
mod size;
mod subscriptions;
mod types;
mod warm;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Postgres, Row};

use self::names::Names;
use self::notify::{Tasks, Wake, notify_commits};
use self::render::Statements;
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::FeedPage;
use crate::filter::Filter;
use crate::registry::Registry;
use crate::store::sql::backend_error;
use crate::store::sql::types::TypeCache;
use crate::store::{
    AggregateRow, Backend, BoxFuture, CommitBatch, Listen, LoadRequest, LoadedStream, Locate,
    Store, StoreOptions,
};
use crate::subscription::row::{Claim, Parked, Row as SubscriptionRow, Spec, Write};
use crate::subscription::tx::TxState;

/// How long a connection may sit idle before it is pinged on checkout: a hot connection is
/// used as is, one that idled long enough for a firewall or a restart to drop it is checked.
const PING_AFTER_IDLE: Duration = Duration::from_secs(30);

/// The PostgreSQL backend.
pub(crate) struct PostgresBackend {
    pool: PgPool,
    /// False for a pool the application gave: closing the store leaves it open.
    owns_pool: bool,
    /// Connections handed from one load, commit or read to the next (only on a pool of the
    /// store's own).
    warm: warm::Warm,
    /// One connection for `LISTEN`, apart from the pool so it never takes a worker's place and
    /// never runs a query; `None` when notifications are off.
    listener_pool: Option<PgPool>,
    names: Names,
    sql: Statements,
    subs: subscriptions::Statements,
    options: StoreOptions,
    types: TypeCache,
    wake: Arc<Wake>,
    tasks: Mutex<Tasks>,
    /// When a long hold-back of the feed was last logged.
    last_hold_back_warning: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("schema", &self.names.schema)
            .field("prefix", &self.names.prefix)
            .finish_non_exhaustive()
    }
}

/// Begins a transaction on a connection of `pool`, safe to cancel. sqlx's `begin`, dropped
/// between sending `BEGIN` and its answer, returns the connection to the pool inside the
/// transaction, where later statements would run and hold their locks for good; here the
/// `BEGIN` runs in a task of its own, so a dropped caller leaves a whole `Transaction`, which
/// rolls back as the connection returns to the pool.
pub(super) async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin().await }).await {
        Ok(begun) => begun.map_err(backend_error),
        Err(e) => Err(Error::Backend(Box::new(e))),
    }
}

pub(super) fn query(sql: &Arc<str>) -> sqlx::query::Query<'static, Postgres, PgArguments> {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

impl PostgresBackend {
    /// Connects to `url` (one connection at once, so a wrong URL fails here).
    pub(crate) async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("invalid PostgreSQL URL: {e}")))?;
        PostgresBackend::connect(connect, options).await
    }

    /// Connects with the caller's connection options, on a pool built from `options`.
    pub(crate) async fn connect(connect: PgConnectOptions, options: &StoreOptions) -> Result<Self> {
        // annals reads typed integers, never text floats: it sends no `extra_float_digits`,
        // a startup parameter poolers such as pgbouncer refuse.
        let connect = connect.extra_float_digits(None);
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size)
            .min_connections(options.min_connections)
            .acquire_timeout(options.acquire_timeout)
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
            .connect_with(connect)
            .await
            .map_err(backend_error)?;
        PostgresBackend::with_pool(pool, options, true)
    }

    /// Uses the application's `pool` for every query; `LISTEN` gets a connection of its own
    /// (see [`Listen`]).
    pub(crate) fn on_pool(pool: PgPool, options: &StoreOptions) -> Result<Self> {
        PostgresBackend::with_pool(pool, options, false)
    }

    /// Uses `pool` for every query: the store's own (`owns_pool`: closed with the store, its
    /// connections handed from one statement to the next) or the application's.
    fn with_pool(pool: PgPool, options: &StoreOptions, owns_pool: bool) -> Result<Self> {
        let names = Names::new(options)?;
        let listen = match &options.listen {
            Listen::Store => Some(pool.connect_options().as_ref().clone()),
            Listen::Url(url) => Some(
                PgConnectOptions::from_str(url)
                    .map_err(|e| Error::Config(format!("invalid PostgreSQL URL to LISTEN: {e}")))?
                    .extra_float_digits(None),
            ),
            Listen::Off => None,
        };
        // Acquired only to (re)connect the listener: the ping on checkout costs nothing there,
        // and keeps a connection that died with an error from being handed back.
        let listener_pool = listen.map(|connect| {
            PgPoolOptions::new()
                .max_connections(1)
                .test_before_acquire(true)
                .connect_lazy_with(connect)
        });
        let sql = Statements::new(&names);
        let warm = warm::Warm::new(&pool, owns_pool);
        let wake = Arc::new(Wake::default());
        let notifier = tokio::spawn(notify_commits(
            pool.clone(),
            sql.notify.clone(),
            names.channel.clone(),
            wake.clone(),
        ));
        Ok(PostgresBackend {
            pool,
            owns_pool,
            warm,
            listener_pool,
            subs: subscriptions::Statements::new(&names),
            sql,
            names,
            options: options.clone(),
            types: TypeCache::default(),
            wake,
            tasks: Mutex::new(Tasks {
                notifier: Some(notifier),
                ..Tasks::default()
            }),
            last_hold_back_warning: Mutex::new(None),
        })
    }
}

impl PostgresBackend {
    /// Runs one prepared statement on two connections at once, before anything is written. On
    /// the server itself, each connection prepares its own; behind a transaction-mode pooler
    /// that does not keep prepared statements, the second lands on the server connection of
    /// the first and finds the name taken, and the open is refused (see [`open_error`]).
    async fn probe_prepared_statements(&self) -> Result<()> {
        let mut first = self.pool.acquire().await.map_err(backend_error)?;
        sqlx::query("SELECT 1::int4")
            .execute(&mut *first)
            .await
            .map_err(backend_error)?;
        if self.pool.options().get_max_connections() < 2 {
            return Ok(());
        }
        let mut second = self.pool.acquire().await.map_err(backend_error)?;
        sqlx::query("SELECT 1::int4")
            .execute(&mut *second)
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

impl Backend for PostgresBackend {
    fn prepare<'a>(&'a self, registry: &'a Registry) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.options.read_only {
                return self.open_read_only().await;
            }
            let prepared = match self.probe_prepared_statements().await {
                Ok(()) => match self.migrate().await {
                    Ok(()) => self.warm_up(registry).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            prepared.map_err(open_error)
        })
    }

    fn load<'a>(&'a self, request: LoadRequest<'a>) -> BoxFuture<'a, Result<Option<LoadedStream>>> {
        Box::pin(self.load_stream(request))
    }

    fn locate<'a>(&'a self, locate: Locate<'a>) -> BoxFuture<'a, Result<Option<AggregateRow>>> {
        Box::pin(self.locate_row(locate))
    }

    fn commit<'a>(&'a self, batch: &'a CommitBatch) -> BoxFuture<'a, Result<Vec<FeedCursor>>> {
        if self.options.read_only {
            return Box::pin(std::future::ready(Err(Error::ReadOnly)));
        }
        Box::pin(self.run_commit(batch))
    }

    fn read_stream<'a>(
        &'a self,
        id: AggregateId,
        range: crate::store::StreamRange,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>> {
        Box::pin(self.stream_records(id, range))
    }

    fn prune<'a>(&'a self, prune: crate::store::Prune) -> BoxFuture<'a, Result<u64>> {
        if self.options.read_only {
            return Box::pin(std::future::ready(Err(Error::ReadOnly)));
        }
        Box::pin(self.run_prune(prune))
    }

    fn find_events<'a>(
        &'a self,
        ids: &'a [uuid::Uuid],
    ) -> BoxFuture<'a, Result<Vec<(uuid::Uuid, AggregateId, u64)>>> {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await.map_err(backend_error)?;
            self.find_events_on(&mut conn, ids).await
        })
    }

    fn read_feed<'a>(&'a self, after: FeedCursor, limit: usize) -> BoxFuture<'a, Result<FeedPage>> {
        Box::pin(self.feed(after, limit))
    }

    fn read_feed_matching<'a>(
        &'a self,
        after: FeedCursor,
        limit: usize,
        filter: &'a Filter,
    ) -> BoxFuture<'a, Result<FeedPage>> {
        Box::pin(self.feed_matching(after, limit, filter))
    }

    fn subscription_open<'a>(&'a self, spec: &'a Spec) -> BoxFuture<'a, Result<SubscriptionRow>> {
        Box::pin(self.subscription_open(spec))
    }

    fn subscription_claim<'a>(
        &'a self,
        claim: &'a Claim,
    ) -> BoxFuture<'a, Result<Option<SubscriptionRow>>> {
        Box::pin(self.subscription_claim(claim))
    }

    fn subscription_heartbeat<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<u32>> {
        Box::pin(self.subscription_heartbeat(claim))
    }

    fn subscription_rows<'a>(
        &'a self,
        name: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<SubscriptionRow>>> {
        Box::pin(self.subscription_rows(name))
    }

    fn begin_tx(&self) -> BoxFuture<'_, Result<TxState>> {
        Box::pin(self.begin_tx())
    }

    fn commit_tx(&self, tx: TxState, writes: Vec<Write>) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.commit_tx(tx, writes))
    }

    fn parked<'a>(
        &'a self,
        name: &'a str,
        partition: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Parked>>> {
        Box::pin(self.parked(name, partition))
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
            if let Some(listener_pool) = &self.listener_pool {
                listener_pool.close().await;
            }
            // sqlx's `close` waits for every connection checked out: parked ones go back first.
            self.warm.close();
            if self.owns_pool {
                self.pool.close().await;
            }
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Decodes one column. Every column of every statement here has an explicit SQL type, so the
/// per-call type check of `try_get` is skipped (it is a tenth of the cost of a large load); a
/// value that does not decode is still an error.
pub(super) fn get<'r, T>(row: &'r PgRow, index: usize) -> Result<T>
where
    T: sqlx::Decode<'r, Postgres>,
{
    row.try_get_unchecked(index).map_err(backend_error)
}

pub(super) fn no_statement() -> Error {
    Error::Corrupt("a statement is missing from the rendered set".to_owned())
}

pub(super) fn to_i32(value: u32, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::Config(format!("{what} {value} is out of range")))
}

pub(crate) use self::subscriptions::execute;

/// The PostgreSQL backend of `store`: what committing or loading inside a caller's
/// transaction runs on ([`Context::commit_in`](crate::Context::commit_in),
/// [`Store::begin_in`](crate::Store::begin_in)). [`Error::Config`] on another store.
pub(crate) fn of(store: &Store) -> Result<&PostgresBackend> {
    store
        .inner
        .backend
        .as_any()
        .downcast_ref::<PostgresBackend>()
        .ok_or_else(|| {
            Error::Config(
                "committing or loading inside a caller's transaction (commit_in, begin_in) \
                 needs a PostgreSQL store (postgres://…)"
                    .to_owned(),
            )
        })
}

/// An open that failed for a reason the operator must fix becomes [`Error::Config`] that says
/// how: the server refused a write (a role without `INSERT` rights, or a hot standby), or a
/// connection pooler cannot keep prepared statements.
fn open_error(e: Error) -> Error {
    let (code, message) = match &e {
        Error::Backend(source) => match source
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
        {
            Some(db) => (db.code().map(|c| c.into_owned()), db.message().to_owned()),
            None => return e,
        },
        _ => return e,
    };
    match code.as_deref() {
        Some("42501") => Error::Config(format!(
            "cannot open the store read-write: this role may not write to the store's tables \
             ({e}); open it with StoreOptions::read_only(true) to load, read histories and the \
             feed"
        )),
        Some("25006") => Error::Config(format!(
            "cannot open the store read-write: the server is read-only, a hot standby ({e}); \
             open it with StoreOptions::read_only(true) to load, read histories and the feed"
        )),
        // A transaction-mode pooler that hands each transaction another server connection
        // loses the statements this connection prepared, or finds one prepared by another.
        Some("42P05" | "26000") if message.contains("sqlx_s_") => Error::Config(format!(
            "the server connection lost or mixed up prepared statements ({e}): a connection \
             pooler in transaction mode is between annals and PostgreSQL and does not keep \
             prepared statements. Use pgbouncer 1.21 or newer with max_prepared_statements \
             above 0, or the pooler's session mode, or connect to the server directly"
        )),
        _ => e,
    }
}
