//! The context: a unit of work that loads aggregates, stages their new events and snapshots, and
//! commits all of them atomically.

use std::collections::HashMap;
use std::time::SystemTime;

use tracing::Instrument;

use crate::aggregate::{Aggregate, AggregateId, Handles, Root};
use crate::clash::ClashRules;
use crate::error::{Error, Result, Target};
use crate::event::{Event, StoredPayload};
use crate::metadata::Metadata;
use crate::rebuild::{rebuild, snapshot_due};
use crate::store::{Change, CommitBatch, LoadRequest, Locate, StagedEvent, StagedSnapshot, Store};

/// What a context knows of one aggregate it loaded or created.
#[derive(Debug)]
struct Tracked {
    id: AggregateId,
    aggregate_type: &'static str,
    key: Option<String>,
    is_new: bool,
    /// How a new aggregate was created, which decides what a clash at commit means.
    origin: Origin,
    /// The committed version the context started from.
    base: u64,
    events: Vec<StagedEvent>,
    snapshot: Option<StagedSnapshot>,
}

/// How the context came to track an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Loaded from the store, or created with a fresh id (and maybe a key).
    Plain,
    /// Created by [`Context::load_or_create_by_key`]: a key clash at commit means another context
    /// created it first, which a retry resolves by loading it.
    LoadOrCreate,
    /// Created by [`Context::create_with_id`]: an id clash at commit means the id is taken.
    ChosenId,
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
        Ok(self.track_new::<A>(AggregateId::new(), None, Origin::Plain))
    }

    /// A new aggregate under an id the caller chose (an id from another system, say), with no
    /// natural key. It exists in the store once this context commits an event for it.
    ///
    /// Fails with [`Error::IdTaken`] when an aggregate (of any type) already has this id, in
    /// the store or in this context; a concurrent context that commits the same id first makes
    /// this context's commit fail with `IdTaken` too, writing nothing.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.with_id.imported")]
    /// # struct Imported;
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.with_id.order", events(Imported))]
    /// # struct Order;
    /// # impl Apply<Imported> for Order { fn apply(&mut self, _: &Imported) {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// let store = Store::open("memory:").await?;
    /// let id = AggregateId::from(uuid::Uuid::now_v7()); // from another system
    /// let mut ctx = store.begin();
    /// let mut order = ctx.create_with_id::<Order>(id).await?;
    /// ctx.apply(&mut order, Imported)?;
    /// ctx.commit().await?;
    ///
    /// let again = store.begin().create_with_id::<Order>(id).await;
    /// assert!(matches!(again, Err(annals::Error::IdTaken { .. })));
    /// # Ok(()) }
    /// ```
    pub async fn create_with_id<A: Aggregate>(&mut self, id: AggregateId) -> Result<Root<A>> {
        self.writable()?;
        let found = match self.by_id.get(&id).and_then(|&i| self.tracked.get(i)) {
            Some(t) => Some(t.aggregate_type.to_owned()),
            None => self
                .store
                .inner
                .backend
                .locate(Locate::Id(id))
                .await?
                .map(|row| row.aggregate_type),
        };
        if let Some(found) = found {
            return Err(Error::IdTaken {
                aggregate: id,
                found_type: found,
            });
        }
        Ok(self.track_new::<A>(id, None, Origin::ChosenId))
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
        Ok(self.track_new::<A>(AggregateId::new(), Some(key.to_owned()), Origin::Plain))
    }

    /// Loads the aggregate `id`: the newest snapshot of the current shape, if any, then the
    /// events after it. [`Error::NotFound`] when there is none, [`Error::WrongAggregateType`]
    /// when `id` is an aggregate of another type.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.load.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.load.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut ctx = store.begin();
    /// let mut account = ctx.create::<Account>()?;
    /// ctx.apply(&mut account, Opened { owner: "Ann".into() })?;
    /// let id = account.id(); // keep it: it is how you find this aggregate again
    /// ctx.commit().await?;
    ///
    /// let account = store.begin_read_only().load::<Account>(id).await?;
    /// assert_eq!((account.owner.as_str(), account.version()), ("Ann", 1));
    /// # Ok(()) }
    /// ```
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

    /// Loads the aggregate of type `A` with the natural key `key`; [`Error::NotFound`] when
    /// there is none.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.load_by_key.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.load_by_key.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// store.transact(async |ctx| {
    ///     let mut ann = ctx.create_with_key::<Account>("ann@example.com").await?;
    ///     ctx.apply(&mut ann, Opened { owner: "Ann".into() })?;
    ///     Ok::<_, annals::Error>(())
    /// }).await?;
    ///
    /// let mut ctx = store.begin_read_only();
    /// let ann = ctx.load_by_key::<Account>("ann@example.com").await?;
    /// assert_eq!(ann.key(), Some("ann@example.com"));
    /// assert!(matches!(
    ///     ctx.load_by_key::<Account>("bob@example.com").await,
    ///     Err(annals::Error::NotFound { .. })
    /// ));
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.find_by_key.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.find_by_key.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut ctx = store.begin_read_only();
    /// assert!(ctx.find_by_key::<Account>("nobody").await?.is_none());
    /// # Ok(()) }
    /// ```
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
    /// none.
    ///
    /// When another context creates the same key between this load and this context's commit,
    /// the commit fails with [`Error::Conflict`] (not [`Error::KeyTaken`]), writing nothing: a
    /// retry ([`Store::transact_with_retry`]) then loads the aggregate the other context
    /// created. So many tasks signing up one key at once all succeed through the retry helper.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.load_or_create.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.load_or_create.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// for _ in 0..2 {
    ///     store.transact_with_retry(Retry::default(), async |ctx| {
    ///         let mut ann = ctx.load_or_create_by_key::<Account>("ann").await?;
    ///         if ann.version() == 0 {
    ///             ctx.apply(&mut ann, Opened { owner: "Ann".into() })?; // only the first time
    ///         }
    ///         Ok::<_, annals::Error>(())
    ///     }).await?;
    /// }
    /// let ann = store.begin_read_only().load_by_key::<Account>("ann").await?;
    /// assert_eq!(ann.version(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn load_or_create_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        match self.find_by_key::<A>(key).await? {
            Some(root) => Ok(root),
            None => {
                self.writable()?;
                Ok(self.track_new::<A>(
                    AggregateId::new(),
                    Some(key.to_owned()),
                    Origin::LoadOrCreate,
                ))
            }
        }
    }

    /// Applies `event` to `root` now and stages it for commit. Returns the event's id.
    ///
    /// What is applied is the event as it will be read back: `event` is encoded, the encoding
    /// decoded again, and the decoded value applied, so the state in memory is the state a load
    /// rebuilds. An event whose encoding does not decode ([`Error::RoundTrip`]), or is too large
    /// ([`Error::PayloadTooLarge`]), is refused: nothing is staged and the root is unchanged.
    ///
    /// If the aggregate's snapshot policy fires at the new version, a snapshot is staged too. A
    /// state that cannot be encoded as a snapshot fails with [`Error::Encode`] (`what:
    /// "snapshot"`), staging nothing; the event has then been applied to the root's state, so
    /// the root is left ahead of the context and refused with [`Error::StaleRoot`] from then
    /// on: load the aggregate again. (A snapshot over the size limit is skipped, with a
    /// warning: snapshots only speed up loading.)
    pub fn apply<A, E>(&mut self, root: &mut Root<A>, event: E) -> Result<uuid::Uuid>
    where
        A: Handles<E>,
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
        A: Handles<E>,
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

        // Apply what a load will read back, not the value in hand: the two differ when the
        // encoding loses something, and a load must rebuild the state seen here.
        let event = E::decode(name, E::VERSION, &payload).map_err(|source| Error::RoundTrip {
            type_name: name.to_owned(),
            source,
        })?;
        root.state.handle(&event);
        root.version += 1;
        let event_id = uuid::Uuid::now_v7();
        let snapshot = snapshot_due::<A>(root, max)?;
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
        let clashes = self.clash_rules();
        let Some((store, batch)) = self.into_batch() else {
            return Ok(());
        };
        batch.check_size(store.inner.options.max_commit_bytes)?;
        let span = tracing::debug_span!(
            "annals.commit",
            aggregates = batch.changes.len(),
            events = batch.event_count(),
        );
        match store.inner.backend.commit(&batch).instrument(span).await {
            Ok(()) => Ok(()),
            Err(e) => Err(clashes.classify(&store, e).await),
        }
    }

    /// What a key or id clash at commit means for the aggregates this context created.
    pub(crate) fn clash_rules(&self) -> ClashRules {
        let mut rules = ClashRules::default();
        for t in self
            .tracked
            .iter()
            .filter(|t| t.is_new && !t.events.is_empty())
        {
            match t.origin {
                Origin::LoadOrCreate => {
                    if let Some(key) = &t.key {
                        rules.load_or_create(t.id, t.aggregate_type, key);
                    }
                }
                Origin::ChosenId => {
                    rules.chosen_id(t.id, t.events.first().map(|e| e.event_id));
                }
                Origin::Plain => {}
            }
        }
        rules
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

    fn track_new<A: Aggregate>(
        &mut self,
        id: AggregateId,
        key: Option<String>,
        origin: Origin,
    ) -> Root<A> {
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
            origin,
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
            origin: Origin::Plain,
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
        let clashes = self.clash_rules();
        let Some((store, batch)) = self.into_batch() else {
            return Ok(());
        };
        batch.check_size(store.inner.options.max_commit_bytes)?;
        let span = tracing::debug_span!(
            "annals.commit",
            aggregates = batch.changes.len(),
            events = batch.event_count(),
            in_caller_tx = true,
        );
        match crate::store::sql::postgres::commit_in(&store, conn, &batch)
            .instrument(span)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => Err(clashes.classify(&store, e).await),
        }
    }
}
