//! The context: a unit of work that loads aggregates, stages their new events and snapshots, and
//! commits all of them atomically.

use std::collections::HashMap;
use std::time::SystemTime;

use tracing::Instrument;

use crate::aggregate::{Aggregate, AggregateId, Apply, Handles, Root};
use crate::cache::{CachedState, follow, follow_stored};
use crate::clash::ClashRules;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::metadata::Metadata;
use crate::rebuild::snapshot_due;
use crate::store::{Change, CommitBatch, StagedEvent, StagedSnapshot, Store, Via};

/// What a context knows of one aggregate it loaded or created.
#[derive(Debug)]
pub(crate) struct Tracked {
    pub(crate) id: AggregateId,
    pub(crate) aggregate_type: &'static str,
    pub(crate) key: Option<String>,
    pub(crate) is_new: bool,
    /// How a new aggregate was created, which decides what a clash at commit means.
    pub(crate) origin: Origin,
    /// The committed version the context started from.
    pub(crate) base: u64,
    pub(crate) events: Vec<StagedEvent>,
    pub(crate) snapshot: Option<StagedSnapshot>,
    /// A committed aggregate's key change, written with its events: `Some(Some(key))` sets
    /// `key`, `Some(None)` releases the key.
    pub(crate) rekey: Option<Option<String>>,
    /// With an aggregate cache: a copy of the state with the staged events applied, which a
    /// successful commit hands to the cache.
    pub(crate) cached: Option<CachedState>,
}

/// How the context came to track an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
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
    pub(crate) store: Store,
    pub(crate) read_only: bool,
    pub(crate) tracked: Vec<Tracked>,
    pub(crate) by_id: HashMap<AggregateId, usize>,
    pub(crate) by_key: HashMap<(&'static str, String), usize>,
    metadata: Metadata,
    /// Events applied so far: orders staged events across aggregates.
    applied: u64,
    /// The key the ids of staged events follow from (see [`Context::set_idempotency_key`]).
    idempotency_key: Option<uuid::Uuid>,
    /// True once an event id was chosen by the caller: a failed commit then checks whether
    /// these events are stored already.
    pub(crate) chosen_ids: bool,
}

/// What [`Context::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    already: bool,
}

impl Committed {
    /// A commit that wrote.
    pub(crate) fn fresh() -> Committed {
        Committed { already: false }
    }

    /// True when nothing was written because every event of the commit was stored already,
    /// under its id and for the same aggregate: a retry of a commit that went through (see
    /// [`Context::set_idempotency_key`]).
    pub fn already_committed(&self) -> bool {
        self.already
    }
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
            idempotency_key: None,
            chosen_ids: false,
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
        self.stage(root, event, metadata, None)
    }

    /// [`apply`](Context::apply) with the event's id chosen by the caller (an id from another
    /// system, or one kept to retry the command): a commit whose events are all stored already
    /// under their ids, for the same aggregates, is reported as
    /// [already committed](Committed::already_committed), and writes nothing. An id staged
    /// already in this context is refused with [`Error::EventIdTaken`].
    pub fn apply_with_id<A, E>(
        &mut self,
        root: &mut Root<A>,
        event: E,
        id: uuid::Uuid,
    ) -> Result<uuid::Uuid>
    where
        A: Handles<E>,
        E: Event,
    {
        if self
            .tracked
            .iter()
            .any(|t| t.events.iter().any(|e| e.event_id == id))
        {
            return Err(Error::EventIdTaken { event_id: id });
        }
        self.stage(root, event, Metadata::default(), Some(id))
    }

    /// Makes the ids of the events this context stages from now on follow from `key` and
    /// each event's order in the context, so that running the same command again with the
    /// same key stages the same ids. Give each request its own key (an idempotency key a
    /// client sends, say) and keep it until the request is answered: when a commit fails with
    /// [`Error::CommitOutcomeUnknown`] (the connection died after the commit was sent), run
    /// the command again with the same key; if the first commit went through, the retry's
    /// [`commit`](Context::commit) writes nothing and reports
    /// [`already_committed`](Committed::already_committed), never a conflict or a duplicate.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.idem.paid")]
    /// # struct Paid { cents: i64 }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.idem.bill", events(Paid))]
    /// # struct Bill { paid: i64 }
    /// # impl Apply<Paid> for Bill { fn apply(&mut self, e: &Paid) { self.paid += e.cents } }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let request = uuid::Uuid::now_v7(); // the client's idempotency key
    /// # let mut ctx = store.begin();
    /// # let mut bill = ctx.create_with_key::<Bill>("b-1").await?;
    /// # ctx.apply(&mut bill, Paid { cents: 0 })?;
    /// # ctx.commit().await?;
    /// for attempt in 0..2 {
    ///     let mut ctx = store.begin();
    ///     ctx.set_idempotency_key(request);
    ///     let mut bill = ctx.load_by_key::<Bill>("b-1").await?;
    ///     ctx.apply(&mut bill, Paid { cents: 250 })?;
    ///     let committed = ctx.commit().await?;
    ///     assert_eq!(committed.already_committed(), attempt == 1);
    /// }
    /// let bill = store.begin_read_only().load_by_key::<Bill>("b-1").await?;
    /// assert_eq!(bill.paid, 250); // paid once
    /// # Ok(()) }
    /// ```
    ///
    /// The retry loads the state the first run wrote, so its events stand at later versions:
    /// what counts is that every one of its event ids is stored, for the same aggregate. A
    /// command must therefore stage the same events in the same order when it runs again; one
    /// that refuses on the new state (an overdraft, say) fails before the commit, and one that
    /// stages more events than were stored gets [`Error::PartlyCommitted`]. A command that
    /// creates an aggregate should use
    /// [`load_or_create_by_key`](Context::load_or_create_by_key), which loads it on the retry
    /// (`create_with_key` refuses a taken key at once). The check runs only when a commit
    /// fails, so a commit that succeeds pays nothing for it.
    pub fn set_idempotency_key(&mut self, key: uuid::Uuid) {
        self.idempotency_key = Some(key);
        self.chosen_ids = true;
    }

    /// The id of the event applied next: `chosen`, or one that follows from the idempotency
    /// key, or a fresh UUID v7.
    fn next_event_id(&mut self, chosen: Option<uuid::Uuid>) -> uuid::Uuid {
        if let Some(id) = chosen {
            self.chosen_ids = true;
            return id;
        }
        match self.idempotency_key {
            Some(key) => uuid::Uuid::new_v5(&key, &(self.applied + 1).to_be_bytes()),
            None => uuid::Uuid::now_v7(),
        }
    }

    /// Encodes, applies and stages one event (see [`apply`](Context::apply)).
    fn stage<A, E>(
        &mut self,
        root: &mut Root<A>,
        event: E,
        metadata: Metadata,
        id: Option<uuid::Uuid>,
    ) -> Result<uuid::Uuid>
    where
        A: Handles<E>,
        E: Event,
    {
        let index = self.staging_index(root)?;
        let max = self.store.inner.options.max_payload_bytes;
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
        <A as Apply<E>>::apply(&mut root.state, &event);
        root.version += 1;
        let event_id = self.next_event_id(id);
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
            if self.store.inner.cache.is_some() {
                follow(&mut tracked.cached, root, &event);
            }
        }
        Ok(event_id)
    }

    /// Applies an event given in its stored form, as another store or an export holds it, and
    /// stages it as it is: under `event_type` (a name or alias of one of the aggregate's
    /// events), with `schema_version` and `payload` unchanged. It is applied as a load would
    /// apply it, upcast to the current version, so an import keeps events as they were written.
    /// Returns the event's id.
    ///
    /// Fails with [`Error::UnknownEventType`] for a name the aggregate does not list,
    /// [`Error::EventVersionTooNew`] for a version newer than the code knows, and
    /// [`Error::Decode`] for a payload that does not decode; nothing is staged then.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// #[derive(Event, Serialize, Deserialize)]
    /// #[event(name = "doc.encoded.opened", version = 2)]
    /// struct Opened { owner: String, #[serde(default)] vip: bool }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.encoded.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut ctx = store.begin();
    /// let mut account = ctx.create::<Account>()?;
    /// ctx.apply_encoded(&mut account, "doc.encoded.opened", 1, br#"{"owner":"Ann"}"#.to_vec())?;
    /// let id = account.id();
    /// ctx.commit().await?;
    ///
    /// let history = store.history(id).await?;
    /// assert_eq!(history[0].schema_version, 1); // stored as given
    /// assert_eq!(store.begin_read_only().load::<Account>(id).await?.owner, "Ann");
    /// # Ok(()) }
    /// ```
    pub fn apply_encoded<A: Aggregate>(
        &mut self,
        root: &mut Root<A>,
        event_type: &str,
        schema_version: u32,
        payload: Vec<u8>,
    ) -> Result<uuid::Uuid> {
        let index = self.staging_index(root)?;
        let max = self.store.inner.options.max_payload_bytes;
        let unknown = || Error::UnknownEventType {
            event_type: event_type.to_owned(),
            position: 0,
            aggregate_type: Some(A::NAME.to_owned()),
        };
        let handler = A::handler(event_type).ok_or_else(unknown)?;
        let name = self
            .store
            .inner
            .registry
            .static_name(event_type)
            .ok_or_else(unknown)?;
        check_size("event", name, payload.len(), max)?;
        let metadata = self.metadata.encode();
        check_size("metadata", name, metadata.as_ref().map_or(0, Vec::len), max)?;
        let stored = crate::event::StoredPayload {
            name,
            schema_version,
            payload: &payload,
            position: 0,
        };
        // The handler decodes before it applies: a payload that does not decode leaves the
        // state unchanged.
        handler(&mut root.state, &stored)?;
        root.version += 1;
        let event_id = self.next_event_id(None);
        let snapshot = snapshot_due::<A>(root, max)?;
        self.applied += 1;
        if let Some(tracked) = self.tracked.get_mut(index) {
            if self.store.inner.cache.is_some() {
                follow_stored(&mut tracked.cached, root, handler, &stored);
            }
            tracked.events.push(StagedEvent {
                seq: self.applied,
                version: root.version,
                name,
                schema_version,
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
    ///
    /// Returns what it did: with ids chosen by the caller ([`set_idempotency_key`],
    /// [`apply_with_id`]), a commit whose events are all stored already is
    /// [already committed](Committed::already_committed) and writes nothing; some of its ids
    /// stored for other events is [`Error::EventIdTaken`].
    ///
    /// [`set_idempotency_key`]: Context::set_idempotency_key
    /// [`apply_with_id`]: Context::apply_with_id
    pub async fn commit(mut self) -> Result<Committed> {
        let cached = self.take_cached();
        let chosen_ids = self.chosen_ids;
        let Some((clashes, store, batch)) = self.into_commit()? else {
            return Ok(Committed::fresh());
        };
        let span = commit_span(&batch, false);
        let result = store.inner.backend.commit(&batch).instrument(span).await;
        if let Some(cached) = cached {
            match &result {
                Ok(_) => cached.committed(&store),
                Err(_) => cached.discarded(&store),
            }
        }
        match result {
            Ok(_) => Ok(Committed::fresh()),
            Err(e @ Error::CommitOutcomeUnknown { .. }) => Err(e),
            Err(e) => {
                if chosen_ids && let Some(outcome) = stored_already(&store, &batch).await {
                    return outcome;
                }
                Err(clashes.classify(&store, &mut Via::Store, e).await)
            }
        }
    }

    /// What a commit of this context needs: what a clash means, the store, and the batch,
    /// within the store's commit size; `None` when there is nothing to write.
    pub(crate) fn into_commit(self) -> Result<Option<(ClashRules, Store, CommitBatch)>> {
        let clashes = self.clash_rules();
        let Some((store, batch)) = self.into_batch() else {
            return Ok(None);
        };
        batch.check_size(store.inner.options.max_commit_bytes)?;
        Ok(Some((clashes, store, batch)))
    }

    /// What a key or id clash at commit means for the aggregates this context created.
    fn clash_rules(&self) -> ClashRules {
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
    fn into_batch(self) -> Option<(Store, CommitBatch)> {
        let loaded = self
            .tracked
            .iter()
            .filter(|t| !t.is_new && t.base > 0)
            .map(|t| (t.id, t.base))
            .collect();
        let changes: Vec<Change> = self
            .tracked
            .into_iter()
            .filter(|t| !t.events.is_empty() || t.rekey.is_some())
            .map(|t| Change {
                id: t.id,
                aggregate_type: t.aggregate_type,
                key: t.key,
                is_new: t.is_new,
                expected: t.base,
                events: t.events,
                snapshot: t.snapshot,
                rekey: t.rekey,
                erase: false,
            })
            .collect();
        if changes.is_empty() || self.read_only {
            return None;
        }
        let batch = CommitBatch {
            changes,
            loaded,
            recorded_at: SystemTime::now(),
            inline: self.store.inner.options.inline.clone(),
            cursors: false,
        };
        Some((self.store, batch))
    }

    /// The index of `root`'s aggregate, when this context may stage for it now: the context
    /// is writable, tracks the aggregate, and `root` is its newest root.
    pub(crate) fn staging_index<A>(&self, root: &Root<A>) -> Result<usize> {
        self.writable()?;
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
        Ok(index)
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
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
    ///
    /// With ids chosen by the caller ([`set_idempotency_key`](Context::set_idempotency_key)), a
    /// unit of work whose events were committed before is
    /// [already committed](Committed::already_committed), as with [`Context::commit`]: nothing
    /// of this context was written, and the caller's own writes of this run should be rolled
    /// back, since those of the first run committed with its events.
    #[cfg(feature = "sqlite")]
    pub fn commit_in_sqlite(mut self, tx: &rusqlite::Transaction<'_>) -> Result<Committed> {
        let cached = self.take_cached();
        let chosen_ids = self.chosen_ids;
        let Some((clashes, store, batch)) = self.into_commit()? else {
            return Ok(Committed::fresh());
        };
        let _entered = commit_span(&batch, true).entered();
        let result = crate::store::sql::sqlite::commit_in(&store, tx, &batch);
        // The caller may still roll `tx` back: the cache forgets these aggregates.
        if let Some(cached) = cached {
            cached.discarded(&store);
        }
        match result {
            Ok(()) => Ok(Committed::fresh()),
            Err(e) => {
                if chosen_ids
                    && let Ok(found) =
                        crate::store::sql::sqlite::find_events_in(&store, tx, &event_ids(&batch))
                    && let Some(outcome) = already_stored(&batch, &found)
                {
                    return outcome;
                }
                Err(clashes.classify_without_store(e))
            }
        }
    }
}

/// After a failed commit with ids chosen by the caller: `Some(Ok)` when every event id of
/// `batch` is stored already, for the same aggregate (a run of the command that went through
/// before; a retry loads what that run wrote, so its events stand at later versions);
/// `Some(Err)` when some of its ids are stored for other aggregates, or only some are stored;
/// `None` when none is stored, and the commit's own error stands.
pub(crate) async fn stored_already(
    store: &Store,
    batch: &CommitBatch,
) -> Option<Result<Committed>> {
    stored_already_via(store, &mut Via::Store, batch).await
}

/// [`stored_already`], looking the ids up `via`.
pub(crate) async fn stored_already_via(
    store: &Store,
    via: &mut Via<'_>,
    batch: &CommitBatch,
) -> Option<Result<Committed>> {
    // A failed lookup leaves the commit's own error standing.
    let found = store.find_events_via(via, &event_ids(batch)).await.ok()?;
    already_stored(batch, &found)
}

/// The ids of the events of `batch`.
pub(crate) fn event_ids(batch: &CommitBatch) -> Vec<uuid::Uuid> {
    batch
        .changes
        .iter()
        .flat_map(|c| c.events.iter().map(|e| e.event_id))
        .collect()
}

/// What `found`, where the events of `batch` with those ids are stored, says of a failed commit
/// of `batch` (see [`stored_already`]).
pub(crate) fn already_stored(
    batch: &CommitBatch,
    found: &[(uuid::Uuid, crate::aggregate::AggregateId, u64)],
) -> Option<Result<Committed>> {
    let staged: Vec<(uuid::Uuid, crate::aggregate::AggregateId)> = batch
        .changes
        .iter()
        .flat_map(|c| c.events.iter().map(move |e| (e.event_id, c.id)))
        .collect();
    if found.is_empty() {
        return None;
    }
    if let Some(&(event_id, _, _)) = found
        .iter()
        .find(|(id, aggregate, _)| !staged.contains(&(*id, *aggregate)))
    {
        return Some(Err(Error::EventIdTaken { event_id }));
    }
    match staged
        .iter()
        .find(|(id, _)| !found.iter().any(|(stored, _, _)| stored == id))
    {
        // Some are stored, others not: the command staged more, or other, events this time.
        Some(&(event_id, _)) => Some(Err(Error::PartlyCommitted { event_id })),
        None => Some(Ok(Committed { already: true })),
    }
}

pub(crate) fn check_size(
    what: &'static str,
    type_name: &str,
    size: usize,
    max: usize,
) -> Result<()> {
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
    /// With ids chosen by the caller ([`set_idempotency_key`](Context::set_idempotency_key)), a
    /// unit of work whose events were committed before is
    /// [already committed](Committed::already_committed), as with [`Context::commit`]: nothing
    /// of this context was written; roll the transaction back, since the first run's own writes
    /// committed with its events.
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
    /// This context loads, and diagnoses a failed commit, through the store's pool, on a
    /// connection apart from the one the transaction holds: a unit of work takes two at once,
    /// and behind a transaction-mode pooler (pgbouncer) more concurrent units than server
    /// connections can wait on each other for good. A context bound to the transaction,
    /// [`Store::begin_in`] (a [`TxContext`](crate::TxContext)), loads and commits over the
    /// transaction's connection alone, sees what the transaction wrote, and leaves the
    /// transaction usable after a failed commit: prefer it.
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
    pub async fn commit_in(mut self, conn: &mut sqlx::PgConnection) -> Result<Committed> {
        let cached = self.take_cached();
        let chosen_ids = self.chosen_ids;
        let Some((clashes, store, batch)) = self.into_commit()? else {
            return Ok(Committed::fresh());
        };
        let span = commit_span(&batch, true);
        let backend = crate::store::sql::postgres::of(&store)?;
        let result = backend.commit_in(conn, &batch).instrument(span).await;
        // The caller may still roll the transaction back: the cache forgets these aggregates.
        if let Some(cached) = cached {
            cached.discarded(&store);
        }
        match result {
            Ok(()) => Ok(Committed::fresh()),
            Err(e) => {
                // The lookup runs on the pool: a failed statement aborted the caller's
                // transaction.
                if chosen_ids && let Some(outcome) = stored_already(&store, &batch).await {
                    return outcome;
                }
                Err(clashes.classify(&store, &mut Via::Store, e).await)
            }
        }
    }
}

/// The span of one commit: `annals.commit`, with the aggregates and events it writes.
pub(crate) fn commit_span(batch: &CommitBatch, in_caller_tx: bool) -> tracing::Span {
    tracing::debug_span!(
        "annals.commit",
        aggregates = batch.changes.len(),
        events = batch.event_count(),
        in_caller_tx,
    )
}
