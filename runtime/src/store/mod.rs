//! The store: where events live. [`Store`] is the handle users hold; [`Backend`] is what each
//! storage engine implements, and the only place a concrete database is named.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::aggregate::AggregateId;
use crate::cache::AggregateCache;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::FeedPage;
use crate::filter::Filter;
use crate::registry::{Registry, registry};
use crate::subscription::inline::Inline;
use crate::subscription::row::{Claim, Parked, Row, Spec, Write};
use crate::subscription::tx::TxState;

#[cfg(feature = "memory")]
pub(crate) mod memory;
mod options;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) mod sql;
mod via;

pub use options::{Listen, StoreOptions, Synchronous};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql::{Dialect, Migration, migrations};
pub(crate) use via::Via;

/// Wakes the waiters of [`Store::wait_for_events`] in this process when a commit lands. It
/// counts the wake-ups, so a waiter that read the feed before a commit and registers after it
/// returns at once instead of sleeping through the commit.
#[derive(Debug, Default)]
pub(crate) struct CommitSignal {
    notify: tokio::sync::Notify,
    count: std::sync::atomic::AtomicU64,
}

impl CommitSignal {
    /// Wakes every current waiter.
    pub fn notify(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// How many wake-ups there have been.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits for a wake-up after the `since`-th, or `max_wait` at the most.
    pub async fn wait(&self, since: u64, max_wait: Duration) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.count() != since {
            return;
        }
        let _ = tokio::time::timeout(max_wait, notified).await;
    }
}

/// The first pause of [`Store::wait_for_events`] before it reads a held-back feed again.
pub(crate) const HELD_BACK_FIRST_PAUSE: Duration = Duration::from_millis(5);

/// A boxed future, as the backend trait returns them.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An aggregate's row: its type, key and committed version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AggregateRow {
    pub id: AggregateId,
    pub aggregate_type: String,
    pub key: Option<String>,
    pub version: u64,
    /// Erased ([`Store::erase`]): its events are gone but for the tombstone.
    pub erased: bool,
}

/// Which aggregate to load.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Locate<'a> {
    Id(AggregateId),
    Key {
        aggregate_type: &'a str,
        key: &'a str,
    },
}

/// What a context asks of the backend to rebuild one aggregate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadRequest<'a> {
    pub locate: Locate<'a>,
    /// The snapshot shape to use, or `None` to rebuild from events alone.
    pub snapshot_version: Option<u32>,
    /// Read no further than this version (the version an earlier load in the same context saw).
    pub up_to: Option<u64>,
    /// The caller holds the state at this version (from the aggregate cache): no snapshot, only
    /// the events above it. The row still carries the stored version, so a caller whose version
    /// is ahead of the store's sees it.
    pub after: Option<u64>,
}

/// Which events of one aggregate to read: versions `from..=to`, oldest first or newest first,
/// at most `limit` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamRange {
    pub from: u64,
    pub to: u64,
    pub backward: bool,
    pub limit: u64,
}

impl StreamRange {
    /// Every event above `version`, oldest first.
    pub fn after(version: u64) -> StreamRange {
        StreamRange {
            from: version.saturating_add(1),
            to: u64::MAX,
            backward: false,
            limit: u64::MAX,
        }
    }

    /// True when `version` lies in the range (the limit aside).
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub fn contains(&self, version: u64) -> bool {
        (self.from..=self.to).contains(&version)
    }

    /// The range's bounds and limit as the signed integers databases store.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub fn to_sql(self) -> (i64, i64, i64) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        (clamp(self.from), clamp(self.to), clamp(self.limit))
    }
}

/// What [`Backend::prune`] deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prune {
    /// The aggregate's events at or before its newest snapshot of this shape.
    Events {
        id: AggregateId,
        snapshot_version: u32,
    },
    /// The aggregate's snapshots older than the `keep` newest of this shape (of any shape).
    Snapshots {
        id: AggregateId,
        snapshot_version: u32,
        keep: u64,
    },
}

/// A snapshot as stored.
#[derive(Debug, Clone)]
pub(crate) struct StoredSnapshot {
    pub version: u64,
    pub payload: Vec<u8>,
}

/// An event as needed to rebuild an aggregate.
#[derive(Debug, Clone)]
pub(crate) struct StreamEvent {
    pub version: u64,
    pub position: u64,
    /// Shared with the backend's type cache: no allocation per event.
    pub name: Arc<str>,
    pub schema_version: u32,
    /// Where the payload lies in [`LoadedStream::payloads`].
    pub payload: Range<usize>,
}

/// The answer to a [`LoadRequest`]: the row, the newest usable snapshot and the events after it,
/// in version order, up to the row's version (or `up_to`).
#[derive(Debug, Clone)]
pub(crate) struct LoadedStream {
    pub row: AggregateRow,
    pub snapshot: Option<StoredSnapshot>,
    pub events: Vec<StreamEvent>,
    /// The events' payloads one after the other: one buffer for a whole load, not one
    /// allocation per event.
    pub payloads: Vec<u8>,
}

impl LoadedStream {
    /// The payload of `event`, one of this stream's events.
    pub fn payload(&self, event: &StreamEvent) -> Result<&[u8]> {
        self.payloads.get(event.payload.clone()).ok_or_else(|| {
            Error::Corrupt(format!(
                "the payload of the event at position {} lies outside its load",
                event.position
            ))
        })
    }
}

/// An event staged by a context, encoded and ready to insert.
#[derive(Debug, Clone)]
pub(crate) struct StagedEvent {
    /// The order the context applied it in, across all aggregates of the commit.
    pub seq: u64,
    pub version: u64,
    pub name: &'static str,
    pub schema_version: u32,
    pub payload: Vec<u8>,
    pub metadata: Option<Vec<u8>>,
    pub event_id: uuid::Uuid,
}

/// A snapshot staged by a context.
#[derive(Debug, Clone)]
pub(crate) struct StagedSnapshot {
    pub version: u64,
    pub snapshot_version: u32,
    pub payload: Vec<u8>,
}

/// Everything a context changes for one aggregate.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub id: AggregateId,
    pub aggregate_type: &'static str,
    pub key: Option<String>,
    /// True when the aggregate is created by this commit (its row is inserted).
    pub is_new: bool,
    /// The committed version this context started from (0 for a new aggregate).
    pub expected: u64,
    pub events: Vec<StagedEvent>,
    pub snapshot: Option<StagedSnapshot>,
    /// For an aggregate that exists: its new key (`Some(Some(key))`, and `key` holds it too) or
    /// the release of its key (`Some(None)`), checked and written with its events.
    pub rekey: Option<Option<String>>,
    /// An erasure: the aggregate's events (up to `expected`) and snapshots are deleted and its
    /// row marked erased, in the commit that writes its tombstone.
    pub erase: bool,
}

impl Change {
    /// The version after this commit.
    pub fn new_version(&self) -> u64 {
        self.expected + self.events.len() as u64
    }
}

/// One atomic commit: every change, or none.
#[derive(Debug, Clone)]
pub(crate) struct CommitBatch {
    pub changes: Vec<Change>,
    /// Every aggregate the context loaded, changed or only read, at the version it loaded: the
    /// events this commit's events may have been decided from. (SQLite needs no check of its
    /// own: one write transaction at a time puts every loaded version before the commit.)
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub loaded: Vec<(AggregateId, u64)>,
    pub recorded_at: SystemTime,
    /// The store's inline projections, run in the commit's transaction.
    pub inline: Inline,
    /// The caller wants the events' cursors back.
    pub cursors: bool,
}

impl CommitBatch {
    /// True when a change sets or releases an existing aggregate's key.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub fn rekeys(&self) -> bool {
        self.changes.iter().any(|c| c.rekey.is_some())
    }

    /// True when a change erases an aggregate.
    pub fn erases(&self) -> bool {
        self.changes.iter().any(|c| c.erase)
    }

    /// The ids of the aggregates this batch erases.
    pub fn erased_ids(&self) -> Vec<AggregateId> {
        self.changes
            .iter()
            .filter(|c| c.erase)
            .map(|c| c.id)
            .collect()
    }

    /// The batch with each erasure at the version its aggregate has as the commit runs
    /// (`current`: `(aggregate, version, erased already)` of the erased aggregates, read under
    /// the commit's lock), so that commits landing meanwhile cannot starve an erasure. An aggregate erased
    /// already is [`Error::Conflict`] (its erasure has nothing left to do); one that is gone is
    /// [`Error::NotFound`].
    pub fn erasing_at(&self, current: &[(AggregateId, u64, bool)]) -> Result<CommitBatch> {
        let mut batch = self.clone();
        for change in batch.changes.iter_mut().filter(|c| c.erase) {
            let Some(&(_, version, erased)) = current.iter().find(|(id, _, _)| *id == change.id)
            else {
                return Err(Error::NotFound {
                    aggregate_type: change.aggregate_type.to_owned(),
                    target: crate::error::Target::Id(change.id),
                });
            };
            if erased {
                return Err(Error::Conflict {
                    aggregate_type: change.aggregate_type.to_owned(),
                    aggregate: change.id,
                    expected: change.expected,
                    actual: version,
                });
            }
            change.expected = version;
            for (event, next) in change.events.iter_mut().zip(version + 1..) {
                event.version = next;
            }
        }
        Ok(batch)
    }

    pub fn event_count(&self) -> usize {
        self.changes.iter().map(|c| c.events.len()).sum()
    }

    /// Every event of the batch with its change, in the order the context applied them: the
    /// order the feed gives them.
    pub fn events_in_order(&self) -> Vec<(&Change, &StagedEvent)> {
        let mut events: Vec<(&Change, &StagedEvent)> = self
            .changes
            .iter()
            .flat_map(|c| c.events.iter().map(move |e| (c, e)))
            .collect();
        events.sort_by_key(|(_, e)| e.seq);
        events
    }
    /// The bytes the commit carries: payloads, metadata, snapshots and keys.
    pub fn encoded_size(&self) -> usize {
        self.changes
            .iter()
            .map(|c| {
                let events: usize = c
                    .events
                    .iter()
                    .map(|e| e.payload.len() + e.metadata.as_ref().map_or(0, Vec::len))
                    .sum();
                events
                    + c.snapshot.as_ref().map_or(0, |s| s.payload.len())
                    + c.key.as_ref().map_or(0, String::len)
            })
            .fold(0, usize::saturating_add)
    }

    /// Refuses a batch over `max` bytes before anything is sent.
    pub fn check_size(&self, max: usize) -> Result<()> {
        refuse_over(self.encoded_size(), max)
    }
}

/// [`Error::CommitTooLarge`] when a commit of `size` bytes passes `max`.
pub(crate) fn refuse_over(size: usize, max: usize) -> Result<()> {
    if size > max {
        return Err(Error::CommitTooLarge { size, max });
    }
    Ok(())
}

/// A storage engine. Implementations keep the invariants of the crate docs: `commit` writes a
/// whole batch atomically or nothing, and answers `Conflict` or `KeyTaken` when a version check
/// or a key fails; the feed returns each committed event once, in commit order.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Creates or migrates the schema and warms up the type tables for `registry`.
    fn prepare<'a>(&'a self, registry: &'a Registry) -> BoxFuture<'a, Result<()>>;

    /// Rebuild material for one aggregate; `None` when it does not exist.
    fn load<'a>(&'a self, request: LoadRequest<'a>) -> BoxFuture<'a, Result<Option<LoadedStream>>>;

    /// The row of one aggregate.
    fn locate<'a>(&'a self, locate: Locate<'a>) -> BoxFuture<'a, Result<Option<AggregateRow>>>;

    /// Writes a batch atomically. Returns the cursors of its events in the order the context
    /// applied them when [`CommitBatch::cursors`] asks for them, nothing otherwise.
    fn commit<'a>(&'a self, batch: &'a CommitBatch) -> BoxFuture<'a, Result<Vec<FeedCursor>>>;

    /// The events of one aggregate within `range`, in its order.
    fn read_stream<'a>(
        &'a self,
        id: AggregateId,
        range: StreamRange,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>>;

    /// Deletes what `prune` names; returns how many rows went.
    fn prune<'a>(&'a self, prune: Prune) -> BoxFuture<'a, Result<u64>>;

    /// Where the events with these ids are stored, if they are: `(event id, aggregate,
    /// version)` for each one found, in no order.
    fn find_events<'a>(
        &'a self,
        ids: &'a [uuid::Uuid],
    ) -> BoxFuture<'a, Result<Vec<(uuid::Uuid, AggregateId, u64)>>>;

    /// Up to `limit` events of the global feed after `after`, in commit order, and who holds
    /// back later events, if anyone does. Never waits for a hold-back to end.
    fn read_feed<'a>(&'a self, after: FeedCursor, limit: usize) -> BoxFuture<'a, Result<FeedPage>>;

    /// [`read_feed`](Backend::read_feed) with `filter` applied in the store's own query: up to
    /// `limit` matching events, and in [`FeedPage::scanned`] how far the read looked, so that
    /// a reader moves past the events that did not match. Everything up to `scanned` was
    /// committed when it was read (below the hold-back horizon on PostgreSQL).
    fn read_feed_matching<'a>(
        &'a self,
        after: FeedCursor,
        limit: usize,
        filter: &'a Filter,
    ) -> BoxFuture<'a, Result<FeedPage>>;

    /// Creates the rows of a subscription that does not exist (every partition, at
    /// `spec.initial`); returns partition 0 as stored, for the caller to compare.
    fn subscription_open<'a>(&'a self, spec: &'a Spec) -> BoxFuture<'a, Result<Row>>;

    /// Grants or renews a lease (see [`Claim`]): the partition's row under the lease, or `None`
    /// when another worker holds it.
    fn subscription_claim<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<Option<Row>>>;

    /// Records that `claim.owner` runs `claim.name` for another `claim.lease`; returns how
    /// many workers run it now (their heartbeats not expired), this one included.
    fn subscription_heartbeat<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<u32>>;

    /// The rows of one subscription (or of all), by name and partition.
    fn subscription_rows<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Row>>>;

    /// Opens a transaction for a subscription handler.
    fn begin_tx(&self) -> BoxFuture<'_, Result<TxState>>;

    /// Makes `writes` in `tx`, in order, and commits them all, or nothing: [`Write::missed`]'s
    /// error when a write matched no row (a lost lease, an unknown subscription).
    fn commit_tx(&self, tx: TxState, writes: Vec<Write>) -> BoxFuture<'_, Result<()>>;

    /// The events parked by subscription `name` (in `partition`, or in all).
    fn parked<'a>(
        &'a self,
        name: &'a str,
        partition: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Parked>>>;

    /// A counter of the commits this backend has heard of; read it before reading the feed and
    /// pass it to [`wait_for_change`](Backend::wait_for_change).
    fn changes(&self) -> u64;

    /// Resolves when a commit may have added events to the feed since the counter was `since`
    /// (at once if it already has), or after `max_wait` at the latest. Spurious wake-ups are
    /// allowed: callers read the feed to know.
    fn wait_for_change(&self, since: u64, max_wait: Duration) -> BoxFuture<'_, ()>;

    /// Releases connections.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// The backend as `Any`, for features tied to one database (committing inside a caller's
    /// own transaction).
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    fn as_any(&self) -> &dyn std::any::Any;
}

pub(crate) struct StoreInner {
    pub backend: Box<dyn Backend>,
    pub registry: &'static Registry,
    pub options: StoreOptions,
    /// The aggregate cache, when [`StoreOptions::aggregate_cache`] turns it on.
    pub cache: Option<AggregateCache>,
}

/// A handle to an event store. Cheap to clone; all clones share one backend and its
/// connections.
///
/// ```
/// # async fn demo() -> Result<(), annals::Error> {
/// let store = annals::Store::open("memory:").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a store with default options.
    ///
    /// - `memory:` — a fresh in-memory store (feature `memory`), for tests;
    /// - `sqlite://path/to/file.db` (created when missing), `sqlite::memory:` — SQLite (feature
    ///   `sqlite`, on by default);
    /// - `postgres://user@host/db` — PostgreSQL (feature `postgres`).
    ///
    /// Validates the registry (see [`Registry::validate`]), then creates or migrates the schema
    /// and warms up the type tables.
    pub async fn open(url: &str) -> Result<Store> {
        Store::open_with(url, StoreOptions::default()).await
    }

    /// Opens a store with the given options.
    pub async fn open_with(url: &str, options: StoreOptions) -> Result<Store> {
        options.validate()?;
        let registry = registry();
        registry.validate()?;
        let backend = open_backend(url, &options).await?;
        Store::prepared(backend, registry, options).await
    }

    /// Opens a PostgreSQL store with connection options built by the caller (TLS settings, a
    /// password from a secret store, an application name, …). `options` sizes the pool.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), annals::Error> {
    /// use annals::sqlx::postgres::PgConnectOptions;
    /// let connect = PgConnectOptions::new()
    ///     .host("db.internal")
    ///     .username("shop")
    ///     .database("shop")
    ///     .application_name("shop-api");
    /// let store = annals::Store::open_postgres(connect, annals::StoreOptions::new()).await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "postgres")]
    pub async fn open_postgres(
        connect: sqlx::postgres::PgConnectOptions,
        options: StoreOptions,
    ) -> Result<Store> {
        options.validate()?;
        let registry = registry();
        registry.validate()?;
        let backend = sql::postgres::PostgresBackend::connect(connect, &options).await?;
        Store::prepared(Box::new(backend), registry, options).await
    }

    /// Opens a PostgreSQL store on a pool the application already has: the store runs its
    /// queries on the pool's connections (its size and timeouts are the pool's; the pool
    /// options of `options` are not used), and listens for other processes' commits on a
    /// connection of its own made with the pool's connection settings (see
    /// [`StoreOptions::listen`]). [`Store::close`] leaves the pool open.
    #[cfg(feature = "postgres")]
    pub async fn open_postgres_pool(pool: sqlx::PgPool, options: StoreOptions) -> Result<Store> {
        options.validate()?;
        let registry = registry();
        registry.validate()?;
        let backend = sql::postgres::PostgresBackend::on_pool(pool, &options)?;
        Store::prepared(Box::new(backend), registry, options).await
    }

    /// Creates or migrates the schema and warms up the type tables, then hands out the store.
    async fn prepared(
        backend: Box<dyn Backend>,
        registry: &'static Registry,
        options: StoreOptions,
    ) -> Result<Store> {
        backend.prepare(registry).await?;
        let cache =
            (options.aggregate_cache > 0).then(|| AggregateCache::new(options.aggregate_cache));
        Ok(Store {
            inner: Arc::new(StoreInner {
                backend,
                registry,
                options,
                cache,
            }),
        })
    }

    /// Empties the aggregate cache (see [`StoreOptions::aggregate_cache`]) of this handle and
    /// its clones: every aggregate is loaded in full once more. Call it after restoring the
    /// database from a backup while this handle stays open.
    pub fn clear_aggregate_cache(&self) {
        if let Some(cache) = &self.inner.cache {
            cache.clear();
        }
    }

    /// How many aggregates the aggregate cache holds now (0 when it is off).
    pub fn cached_aggregates(&self) -> usize {
        self.inner.cache.as_ref().map_or(0, AggregateCache::len)
    }

    /// The registry this store was validated against.
    pub fn registry(&self) -> &'static Registry {
        self.inner.registry
    }

    /// The options this store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// A new read-write context. It writes nothing until [`Context::commit`]; dropped, it
    /// discards what it staged.
    ///
    /// On a store opened with [`StoreOptions::read_only`], this context is read-only too.
    pub fn begin(&self) -> Context {
        Context::new(self.clone(), self.inner.options.read_only)
    }

    /// A new read-only context: it loads aggregates and refuses to stage events.
    pub fn begin_read_only(&self) -> Context {
        Context::new(self.clone(), true)
    }

    /// Every event of one aggregate, oldest first.
    pub async fn history(&self, id: AggregateId) -> Result<Vec<RecordedEvent>> {
        self.inner
            .backend
            .read_stream(id, StreamRange::after(0))
            .await
    }

    /// Up to `limit` events of the global feed after `after`, each once, in commit order. Pass
    /// [`FeedCursor::START`] to read from the beginning, then the `cursor` of the last event
    /// read. It never waits: a page shorter than `limit` means there is nothing more to read
    /// now.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # async fn demo(store: &Store) -> Result<(), annals::Error> {
    /// let mut cursor = FeedCursor::START;
    /// loop {
    ///     let page = store.read_feed(cursor, 500).await?;
    ///     let Some(last) = page.last() else { break };
    ///     cursor = last.cursor;
    ///     for event in &page {
    ///         // Decode by type: `event.decode::<MyEvent>()?` is `None` for other types.
    ///         println!("{} {}", event.position(), event.event_type);
    ///     }
    /// }
    /// // Keep `cursor` (it is `Serialize`) to read on from there later.
    /// # Ok(()) }
    /// ```
    ///
    /// On PostgreSQL the feed never runs ahead of a transaction that is still open, so that an
    /// event committed late is never skipped: while a transaction that could write to the
    /// store's database stays open, events committed after it began are held back, and the
    /// page says so in [`FeedPage::held_back`], with that transaction's id and, where the
    /// server shows them, its pid, database and age. Transactions of other databases of the
    /// server do not hold the feed back; any transaction of the same database does, whatever
    /// tables it writes. A hold-back longer than [`StoreOptions::hold_back_warning`] is logged
    /// (`tracing`, at most once a minute). Set `idle_in_transaction_session_timeout` on the
    /// server so a forgotten session cannot hold the feed back for long.
    ///
    /// ```
    /// # async fn demo(store: annals::Store) -> Result<(), annals::Error> {
    /// use annals::FeedCursor;
    /// let mut cursor = FeedCursor::START;
    /// loop {
    ///     let page = store.read_feed(cursor, 100).await?;
    ///     for event in &page {
    ///         println!("{} {} v{}", event.event_type, event.aggregate_id, event.version);
    ///     }
    ///     cursor = page.cursor_or(cursor);
    ///     if page.len() < 100 {
    ///         if let Some(held) = &page.held_back {
    ///             println!("not caught up: {held}");
    ///         }
    ///         break;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn read_feed(&self, after: FeedCursor, limit: usize) -> Result<FeedPage> {
        self.inner.backend.read_feed(after, limit).await
    }

    /// [`read_feed`](Store::read_feed) of the events that pass `filter`, which the store applies
    /// in its own query. Read on after the page's [`scanned`](FeedPage::scanned) cursor, not the
    /// last event's: it moves past the events that did not match, so a sparse filter does not
    /// read the same stretch again.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use annals::Filter;
    /// # async fn demo(store: &Store) -> Result<(), annals::Error> {
    /// let filter = Filter::all().event_named("account.opened");
    /// let mut cursor = FeedCursor::START;
    /// loop {
    ///     let page = store.read_feed_matching(cursor, 100, &filter).await?;
    ///     for event in &page {
    ///         println!("{} opened at {}", event.aggregate_id, event.position());
    ///     }
    ///     cursor = page.scanned;
    ///     if page.len() < 100 {
    ///         break;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// Fails with [`Error::Config`] for a filter by natural key without exactly one aggregate
    /// type.
    pub async fn read_feed_matching(
        &self,
        after: FeedCursor,
        limit: usize,
        filter: &Filter,
    ) -> Result<FeedPage> {
        filter.check()?;
        if filter.is_all() {
            return self.read_feed(after, limit).await;
        }
        self.inner
            .backend
            .read_feed_matching(after, limit, filter)
            .await
    }

    /// Waits until the feed holds events after `after`, for at most `timeout`. Returns true
    /// when there are such events, false when the time ran out first (any `timeout` works,
    /// `Duration::MAX` included).
    ///
    /// Commits made through this process wake waiters at once; on PostgreSQL, commits of other
    /// processes wake them through `LISTEN`/`NOTIFY`. Otherwise the feed is polled every
    /// [`StoreOptions::poll_interval`]. While the feed is held back (PostgreSQL, see
    /// [`read_feed`](Store::read_feed)), the end of the transaction holding it sends no
    /// notification: the feed is then read again after 5 ms, 10 ms, … up to the poll interval.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use annals::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// let store = Store::open("memory:").await?;
    /// let mut cursor = FeedCursor::START;
    /// // A reader that is caught up waits for the next commit, here for a tenth of a second.
    /// if store.wait_for_events(cursor, Duration::from_millis(100)).await? {
    ///     for event in store.read_feed(cursor, 100).await? {
    ///         println!("{} v{} {}", event.aggregate_id, event.version, event.event_type);
    ///         cursor = event.cursor;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait_for_events(&self, after: FeedCursor, timeout: Duration) -> Result<bool> {
        // No deadline when the timeout reaches past what an instant can hold.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let poll = self.inner.options.poll_interval;
        let mut held_pause = HELD_BACK_FIRST_PAUSE.min(poll);
        loop {
            let since = self.inner.backend.changes();
            let page = self.read_feed(after, 1).await?;
            if !page.is_empty() {
                return Ok(true);
            }
            let mut wait = poll;
            if page.held_back.is_some() {
                wait = held_pause;
                held_pause = held_pause.saturating_mul(2).min(poll);
            }
            if let Some(deadline) = deadline {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Ok(false);
                }
                wait = wait.min(deadline - now);
            }
            self.inner.backend.wait_for_change(since, wait).await;
        }
    }

    /// Closes the store's connections; later calls on any clone fail.
    pub async fn close(&self) {
        self.inner.backend.close().await
    }
}

async fn open_backend(url: &str, options: &StoreOptions) -> Result<Box<dyn Backend>> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        #[cfg(feature = "memory")]
        "memory" if url == "memory:" => Ok(Box::new(memory::MemoryBackend::new(options))),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Box::new(
            sql::sqlite::SqliteBackend::open(url, options).await?,
        )),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Box::new(
            sql::postgres::PostgresBackend::open(url, options).await?,
        )),
        _ => {
            let _ = options;
            Err(Error::Config(format!(
                "unsupported store URL {url:?}: expected memory:, sqlite://… or postgres://… \
                 (with the matching cargo feature enabled)"
            )))
        }
    }
}

/// Converts a stored integer into the unsigned form the API uses.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Corrupt(format!("negative {what}: {value}")))
}

/// Converts an unsigned value into the signed form databases store.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Config(format!("{what} {value} is out of range")))
}

/// Microseconds since the Unix epoch, as stored.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn to_micros(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The inverse of [`to_micros`].
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn from_micros(micros: i64) -> SystemTime {
    let magnitude = Duration::from_micros(micros.unsigned_abs());
    let t = if micros >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    };
    t.unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_before_the_wait_is_not_missed() {
        let signal = CommitSignal::default();
        let since = signal.count();
        // The commit lands after the waiter read the feed, before it waits.
        signal.notify();
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            signal.wait(since, Duration::from_secs(3600)),
        )
        .await;
        assert!(waited.is_ok(), "the wait returned at once");
        assert_eq!(signal.count(), since + 1);
    }
}
