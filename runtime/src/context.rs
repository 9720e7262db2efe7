//! The context: a unit of work that loads aggregates, stages their new events and snapshots, and
//! commits all of them atomically.

use std::collections::HashMap;
use std::time::SystemTime;

use tracing::Instrument;

use crate::aggregate::{Aggregate, AggregateId, Handles, Root};
use crate::error::{Error, Result, Target};
use crate::event::{Event, StoredPayload};
use crate::metadata::Metadata;
use crate::store::{
    Change, CommitBatch, LoadRequest, LoadedStream, Locate, StagedEvent, StagedSnapshot, Store,
};

/// What a context knows of one aggregate it loaded or created.
#[derive(Debug)]
struct Tracked {
    id: AggregateId,
    aggregate_type: &'static str,
    key: Option<String>,
    is_new: bool,
    /// The committed version the context started from.
    base: u64,
    events: Vec<StagedEvent>,
    snapshot: Option<StagedSnapshot>,
}

impl Tracked {
    fn current(&self) -> u64 {
        self.base + self.events.len() as u64
    }
}

/// A unit of work: it loads aggregates, stages the events applied to them, and commits
/// everything it staged in one atomic write, or nothing.
///
/// A context is optimistic: loading reads committed state without locking, and nothing is
/// written before [`commit`](Context::commit). At commit every aggregate that received events
/// is checked against the version this context loaded; if another context committed to it in
/// between, the commit fails with [`Error::Conflict`] and writes nothing. A context that is
/// dropped without committing writes nothing.
///
/// Loading the same aggregate twice in one context is allowed: the second root starts from the
/// same committed version as the first, with the events this context staged for it since
/// already applied. Only the most recent root of an aggregate can stage events; applying to an
/// older one fails with [`Error::StaleRoot`].
#[derive(Debug)]
pub struct Context {
    store: Store,
    read_only: bool,
    tracked: Vec<Tracked>,
    by_id: HashMap<AggregateId, usize>,
    by_key: HashMap<(&'static str, String), usize>,
    metadata: Metadata,
    /// Events applied so far: orders staged events across aggregates.
    applied: u64,
}

impl Context {
    pub(crate) fn new(store: Store, read_only: bool) -> Self {
        Context {
            store,
            read_only,
            tracked: Vec::new(),
            by_id: HashMap::new(),
            by_key: HashMap::new(),
            metadata: Metadata::default(),
            applied: 0,
        }
    }

    /// The store this context reads from and commits to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// True for a context from [`Store::begin_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Metadata recorded with every event this context stages from now on (per-event metadata
    /// given to [`apply_with`](Context::apply_with) is laid on top).
    pub fn set_metadata(&mut self, metadata: Metadata) {
        self.metadata = metadata;
    }

    /// The context's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// How many events are staged, across all aggregates.
    pub fn staged_events(&self) -> usize {
        self.tracked.iter().map(|t| t.events.len()).sum()
    }

    /// A new aggregate with a fresh id and no natural key. It exists in the store once this
    /// context commits an event for it.
    pub fn create<A: Aggregate>(&mut self) -> Result<Root<A>> {
        self.writable()?;
        Ok(self.track_new::<A>(None))
    }

    /// A new aggregate with the natural key `key`, unique among aggregates of type `A`.
    ///
    /// Fails with [`Error::KeyTaken`] when the key is already committed or created in this
    /// context; a concurrent context that commits the same key first makes this context's
    /// commit fail with `KeyTaken`.
    pub async fn create_with_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        self.writable()?;
        check_key(key)?;
        let taken = self.by_key.contains_key(&(A::NAME, key.to_owned()))
            || self
                .store
                .inner
                .backend
                .locate(Locate::Key {
                    aggregate_type: A::NAME,
                    key,
                })
                .await?
                .is_some();
        if taken {
            return Err(Error::KeyTaken {
                aggregate_type: A::NAME.to_owned(),
                key: key.to_owned(),
            });
        }
        Ok(self.track_new::<A>(Some(key.to_owned())))
    }

    /// Loads the aggregate `id`: the newest snapshot of the current shape, if any, then the
    /// events after it.
    pub async fn load<A: Aggregate>(&mut self, id: AggregateId) -> Result<Root<A>> {
        if let Some(&index) = self.by_id.get(&id) {
            return self.reload::<A>(index).await;
        }
        match self.fetch::<A>(Locate::Id(id), None).await? {
            Some(loaded) => self.track_loaded(loaded),
            None => Err(Error::NotFound {
                aggregate_type: A::NAME.to_owned(),
                target: Target::Id(id),
            }),
        }
    }

    /// Loads the aggregate of type `A` with the natural key `key`.
    pub async fn load_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        match self.find_by_key::<A>(key).await? {
            Some(root) => Ok(root),
            None => Err(Error::NotFound {
                aggregate_type: A::NAME.to_owned(),
                target: Target::Key(key.to_owned()),
            }),
        }
    }

    /// Loads the aggregate of type `A` with the natural key `key`, or `None` when there is none.
    pub async fn find_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Option<Root<A>>> {
        check_key(key)?;
        if let Some(&index) = self.by_key.get(&(A::NAME, key.to_owned())) {
            return self.reload::<A>(index).await.map(Some);
        }
        let locate = Locate::Key {
            aggregate_type: A::NAME,
            key,
        };
        match self.fetch::<A>(locate, None).await? {
            Some(loaded) => match self.by_id.get(&loaded.id) {
                // Loaded by id earlier in this context: keep that view.
                Some(&index) => self.reload::<A>(index).await.map(Some),
                None => self.track_loaded(loaded).map(Some),
            },
            None => Ok(None),
        }
    }

    /// Loads the aggregate of type `A` with the natural key `key`, or creates it when there is
    /// none (see [`create_with_key`](Context::create_with_key) for what happens when two
    /// contexts create one key at once).
    pub async fn load_or_create_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        match self.find_by_key::<A>(key).await? {
            Some(root) => Ok(root),
            None => {
                self.writable()?;
                Ok(self.track_new::<A>(Some(key.to_owned())))
            }
        }
    }

    /// Applies `event` to `root` now and stages it for commit. Returns the event's id.
    ///
    /// If the aggregate's snapshot policy fires at the new version, a snapshot is staged too.
    /// Nothing is staged, and the root is unchanged, when this fails.
    pub fn apply<A, E>(&mut self, root: &mut Root<A>, event: E) -> Result<uuid::Uuid>
    where
        A: Handles<E> + crate::Apply<E>,
        E: Event,
    {
        self.apply_with(root, event, Metadata::default())
    }

    /// [`apply`](Context::apply) with metadata for this one event, laid over the context's.
    pub fn apply_with<A, E>(
        &mut self,
        root: &mut Root<A>,
        event: E,
        metadata: Metadata,
    ) -> Result<uuid::Uuid>
    where
        A: Handles<E> + crate::Apply<E>,
        E: Event,
    {
        self.writable()?;
        let max = self.store.inner.options.max_payload_bytes;
        let index = *self
            .by_id
            .get(&root.id)
            .ok_or(Error::ForeignRoot { aggregate: root.id })?;
        let context_version = self.tracked.get(index).map_or(0, Tracked::current);
        if root.version != context_version {
            return Err(Error::StaleRoot {
                aggregate: root.id,
                root_version: root.version,
                context_version,
            });
        }
        let name = event.name();
        let payload = event.encode().map_err(|source| Error::Encode {
            what: "event",
            type_name: name.to_owned(),
            source,
        })?;
        check_size("event", name, payload.len(), max)?;
        let metadata = if metadata.is_empty() {
            self.metadata.encode()
        } else {
            self.metadata.merged(&metadata).encode()
        };
        check_size("metadata", name, metadata.as_ref().map_or(0, Vec::len), max)?;

        <A as crate::Apply<E>>::apply(&mut root.state, &event);
        root.version += 1;
        let event_id = uuid::Uuid::now_v7();
        let snapshot = snapshot_due::<A>(root, max);
        self.applied += 1;
        if let Some(tracked) = self.tracked.get_mut(index) {
            tracked.events.push(StagedEvent {
                seq: self.applied,
                version: root.version,
                name,
                schema_version: E::VERSION,
                payload,
                metadata,
                event_id,
            });
            if snapshot.is_some() {
                tracked.snapshot = snapshot;
            }
        }
        Ok(event_id)
    }

    /// Writes every staged event and snapshot in one atomic commit.
    ///
    /// Fails with [`Error::Conflict`] when another context committed to one of the aggregates
    /// since it was loaded, or [`Error::KeyTaken`] when a new aggregate's key was committed
    /// first; nothing of this context is written then. A context with nothing staged (and every
    /// read-only context) commits without touching the store.
    pub async fn commit(self) -> Result<()> {
        let Some((store, batch)) = self.into_batch() else {
            return Ok(());
        };
        batch.check_size(store.inner.options.max_commit_bytes)?;
        let span = commit_span(&batch, false);
        store.inner.backend.commit(&batch).instrument(span).await
    }

    /// The store and what to write, or `None` when nothing is staged.
    pub(crate) fn into_batch(self) -> Option<(Store, CommitBatch)> {
        let loaded = self
            .tracked
            .iter()
            .filter(|t| !t.is_new && t.base > 0)
            .map(|t| (t.id, t.base))
            .collect();
        let changes: Vec<Change> = self
            .tracked
            .into_iter()
            .filter(|t| !t.events.is_empty())
            .map(|t| Change {
                id: t.id,
                aggregate_type: t.aggregate_type,
                key: t.key,
                is_new: t.is_new,
                expected: t.base,
                events: t.events,
                snapshot: t.snapshot,
            })
            .collect();
        if changes.is_empty() || self.read_only {
            return None;
        }
        let batch = CommitBatch {
            changes,
            loaded,
            recorded_at: SystemTime::now(),
        };
        Some((self.store, batch))
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn track_new<A: Aggregate>(&mut self, key: Option<String>) -> Root<A> {
        let id = AggregateId::new();
        let index = self.tracked.len();
        if let Some(key) = &key {
            self.by_key.insert((A::NAME, key.clone()), index);
        }
        self.by_id.insert(id, index);
        self.tracked.push(Tracked {
            id,
            aggregate_type: A::NAME,
            key: key.clone(),
            is_new: true,
            base: 0,
            events: Vec::new(),
            snapshot: None,
        });
        Root {
            id,
            key,
            version: 0,
            state: A::default(),
        }
    }

    fn track_loaded<A: Aggregate>(&mut self, root: Root<A>) -> Result<Root<A>> {
        let index = self.tracked.len();
        if let Some(key) = &root.key {
            self.by_key.insert((A::NAME, key.clone()), index);
        }
        self.by_id.insert(root.id, index);
        self.tracked.push(Tracked {
            id: root.id,
            aggregate_type: A::NAME,
            key: root.key.clone(),
            is_new: false,
            base: root.version,
            events: Vec::new(),
            snapshot: None,
        });
        Ok(root)
    }

    /// A fresh root for an aggregate this context already tracks: the committed state it
    /// started from, plus the events it staged since.
    async fn reload<A: Aggregate>(&mut self, index: usize) -> Result<Root<A>> {
        let (id, aggregate_type, is_new, base) = match self.tracked.get(index) {
            Some(t) => (t.id, t.aggregate_type, t.is_new, t.base),
            None => return Err(Error::Corrupt("context index out of range".to_owned())),
        };
        if aggregate_type != A::NAME {
            return Err(Error::WrongAggregateType {
                aggregate: id,
                expected: A::NAME.to_owned(),
                found: aggregate_type.to_owned(),
            });
        }
        let mut root = if is_new {
            Root {
                id,
                key: self.tracked.get(index).and_then(|t| t.key.clone()),
                version: 0,
                state: A::default(),
            }
        } else {
            match self.fetch::<A>(Locate::Id(id), Some(base)).await? {
                Some(root) => root,
                None => {
                    return Err(Error::NotFound {
                        aggregate_type: A::NAME.to_owned(),
                        target: Target::Id(id),
                    });
                }
            }
        };
        if let Some(tracked) = self.tracked.get(index) {
            for staged in &tracked.events {
                root.state.apply_stored(&StoredPayload {
                    name: staged.name,
                    schema_version: staged.schema_version,
                    payload: &staged.payload,
                    position: 0,
                })?;
                root.version = staged.version;
            }
        }
        Ok(root)
    }

    /// Commits this context inside the caller's own SQLite transaction, so the events and the
    /// caller's own table writes commit together, or roll back together. Nothing is visible to
    /// others until the caller commits `tx`; if it rolls back, nothing of the context was written.
    ///
    /// `tx` must be on the store's own file (a `sqlite::memory:` store cannot share its
    /// database). Begin it with [`TransactionBehavior::Immediate`](rusqlite::TransactionBehavior)
    /// so that it holds the write lock from the start, as the store's own commits do. A version
    /// check that fails is [`Error::Conflict`] or [`Error::KeyTaken`], and what the context
    /// wrote before it is undone only when the caller rolls `tx` back (dropping it does). Fails
    /// with [`Error::Config`] on a store that is not SQLite. Synchronous: rusqlite's connection
    /// lives on the caller's thread.
    ///
    /// ```no_run
    /// use annals::prelude::*;
    /// use annals::rusqlite::{Connection, TransactionBehavior};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Event, Serialize, Deserialize)]
    /// struct Shipped { weight: i64 }
    ///
    /// #[derive(Aggregate, Serialize, Deserialize, Default)]
    /// #[aggregate(name = "parcel", events(Shipped))]
    /// struct Parcel { weight: i64 }
    ///
    /// impl Apply<Shipped> for Parcel {
    ///     fn apply(&mut self, e: &Shipped) { self.weight = e.weight }
    /// }
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Store::open("sqlite://shop.db").await?;
    /// let mut conn = Connection::open("shop.db")?;
    ///
    /// let mut ctx = store.begin();
    /// let mut parcel = ctx.create_with_key::<Parcel>("parcel-7").await?;
    /// ctx.apply(&mut parcel, Shipped { weight: 120 })?;
    ///
    /// let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    /// tx.execute("INSERT INTO labels (parcel, carrier) VALUES (?1, ?2)", ("parcel-7", "post"))?;
    /// ctx.commit_in_sqlite(&tx)?; // staged in `tx`, not yet visible
    /// tx.commit()?; // the label and the parcel's events, together
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "sqlite")]
    pub fn commit_in_sqlite(self, tx: &rusqlite::Transaction<'_>) -> Result<()> {
        let Some((store, batch)) = self.into_batch() else {
            return Ok(());
        };
        batch.check_size(store.inner.options.max_commit_bytes)?;
        let _entered = commit_span(&batch, true).entered();
        crate::store::sql::sqlite::commit_in(&store, tx, &batch)
    }

    /// Reads and rebuilds one aggregate from the store.
    async fn fetch<A: Aggregate>(
        &self,
        locate: Locate<'_>,
        up_to: Option<u64>,
    ) -> Result<Option<Root<A>>> {
        let span = tracing::debug_span!(
            "annals.load",
            aggregate_type = A::NAME,
            aggregate = tracing::field::Empty,
            version = tracing::field::Empty,
            events = tracing::field::Empty,
        );
        async {
            let backend = &self.store.inner.backend;
            let request = LoadRequest {
                locate,
                snapshot_version: A::SNAPSHOT_EVERY.map(|_| A::SNAPSHOT_VERSION),
                up_to,
            };
            let Some(stream) = backend.load(request).await? else {
                return Ok(None);
            };
            let span = tracing::Span::current();
            span.record("aggregate", tracing::field::display(stream.row.id));
            match rebuild::<A>(&stream) {
                Ok(root) => {
                    span.record("version", root.version);
                    span.record("events", stream.events.len());
                    Ok(Some(root))
                }
                Err(Error::Decode {
                    what: "snapshot",
                    source,
                    ..
                }) => {
                    tracing::warn!(
                        aggregate = %stream.row.id,
                        error = %source,
                        "snapshot does not decode; rebuilding from events"
                    );
                    let request = LoadRequest {
                        snapshot_version: None,
                        ..request
                    };
                    match backend.load(request).await? {
                        Some(stream) => rebuild::<A>(&stream).map(Some),
                        None => Ok(None),
                    }
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
    }
}

/// Folds a loaded stream into a root, checking that versions follow each other with no gap.
fn rebuild<A: Aggregate>(stream: &LoadedStream) -> Result<Root<A>> {
    let row = &stream.row;
    if row.aggregate_type != A::NAME {
        return Err(Error::WrongAggregateType {
            aggregate: row.id,
            expected: A::NAME.to_owned(),
            found: row.aggregate_type.clone(),
        });
    }
    let (mut state, mut version) = match &stream.snapshot {
        Some(snapshot) => (
            A::decode_snapshot(&snapshot.payload, snapshot.version)?,
            snapshot.version,
        ),
        None => (A::default(), 0),
    };
    for event in &stream.events {
        if event.version != version + 1 {
            return Err(Error::Corrupt(format!(
                "aggregate {} jumps from version {version} to {} at position {}",
                row.id, event.version, event.position
            )));
        }
        state.apply_stored(&StoredPayload {
            name: &event.name,
            schema_version: event.schema_version,
            payload: &event.payload,
            position: event.position,
        })?;
        version = event.version;
    }
    Ok(Root {
        id: row.id,
        key: row.key.clone(),
        version,
        state,
    })
}

/// The snapshot to stage after `root` reached its current version, if the policy fires. A
/// snapshot that cannot be encoded or is too large is skipped: snapshots only speed up loading.
fn snapshot_due<A: Aggregate>(root: &Root<A>, max: usize) -> Option<StagedSnapshot> {
    let every = A::SNAPSHOT_EVERY?;
    if every == 0 || !root.version.is_multiple_of(every) {
        return None;
    }
    match root.state.encode_snapshot()? {
        Ok(payload) if payload.len() <= max => Some(StagedSnapshot {
            version: root.version,
            snapshot_version: A::SNAPSHOT_VERSION,
            payload,
        }),
        Ok(payload) => {
            tracing::warn!(
                aggregate = %root.id,
                size = payload.len(),
                max,
                "snapshot over the payload limit; not staged"
            );
            None
        }
        Err(error) => {
            tracing::warn!(aggregate = %root.id, %error, "snapshot does not encode; not staged");
            None
        }
    }
}

/// Natural keys are non-empty text of at most 1,024 bytes without NUL, on every store.
fn check_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "it is empty"
    } else if key.len() > 1024 {
        "it is longer than 1,024 bytes"
    } else if key.contains('\0') {
        "it contains a NUL character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

fn check_size(what: &'static str, type_name: &str, size: usize, max: usize) -> Result<()> {
    if size > max {
        Err(Error::PayloadTooLarge {
            what,
            type_name: type_name.to_owned(),
            size,
            max,
        })
    } else {
        Ok(())
    }
}

/// Committing inside a caller's own transaction.
#[cfg(feature = "postgres")]
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
    /// Every isolation level works. At `REPEATABLE READ` and `SERIALIZABLE` the transaction's
    /// snapshot is taken at its first statement: when an aggregate this context loaded was
    /// committed after that, the transaction cannot commit on top of it, and this fails with
    /// [`Error::StaleTransaction`] (a conflict: roll back and re-run the whole unit). Load
    /// before the transaction's first statement to avoid it.
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
    pub async fn commit_in(self, conn: &mut sqlx::PgConnection) -> Result<()> {
        let Some((store, batch)) = self.into_batch() else {
            return Ok(());
        };
        batch.check_size(store.inner.options.max_commit_bytes)?;
        let span = commit_span(&batch, true);
        crate::store::sql::postgres::commit_in(&store, conn, &batch)
            .instrument(span)
            .await
    }
}

/// The span of one commit: `annals.commit`, with the aggregates and events it writes.
fn commit_span(batch: &CommitBatch, in_caller_tx: bool) -> tracing::Span {
    tracing::debug_span!(
        "annals.commit",
        aggregates = batch.changes.len(),
        events = batch.event_count(),
        in_caller_tx,
    )
}
