//! Pruning and erasure: dropping an aggregate's events before its newest snapshot, keeping only
//! its newest snapshots, and deleting an aggregate on an erasure request, leaving a tombstone
//! event in the feed.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::aggregate::AggregateId;
use crate::error::{Error, Result, Target};
use crate::event::{Event, FeedCursor};
use crate::metadata::Metadata;
use crate::registry::{AggregateInfo, EventRegistration};
use crate::store::{AggregateRow, Change, CommitBatch, Locate, Prune, StagedEvent, Store};

/// The tombstone [`Store::erase`] writes in place of an erased aggregate's events, under the
/// name `annals.erased`, with the aggregate's id and type. Projections list it like any event to
/// delete what they hold of the aggregate.
///
/// ```
/// # use annals::prelude::*;
/// # use annals::Erased;
/// # async fn demo(event: RecordedEvent) -> Result<(), annals::Error> {
/// if event.decode::<Erased>()?.is_some() {
///     println!("forget {} {}", event.aggregate_type, event.aggregate_id);
/// }
/// # Ok(()) }
/// ```
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {}

// Written out rather than derived, so that the compiler does not offer it as an example when a
// user's own type lacks `Event`.
#[diagnostic::do_not_recommend]
impl Event for Erased {
    const REGISTRATION: EventRegistration = EventRegistration {
        rust_type: "annals::Erased",
        ..EventRegistration::by_hand::<Erased>(&["annals.erased"], 1)
    };
}

// No aggregate lists it: the runtime registers it itself.
inventory::submit! { <Erased as Event>::REGISTRATION }

/// How many times an erasure is tried; only an erasure of the same aggregate meanwhile makes a
/// try fail, and the next one then finds it erased.
const ERASE_ATTEMPTS: u32 = 3;

impl Store {
    /// Deletes aggregate `id`'s events at and before its newest snapshot (of the snapshot shape
    /// its type has now, [`snapshot_version`](crate::Aggregate::SNAPSHOT_VERSION)); returns how
    /// many went. Loads stay correct: they start from that snapshot. An aggregate without such
    /// a snapshot keeps every event. On PostgreSQL the newest event of the whole store stays
    /// too: the feed-epoch check reads it to tell a store moved to a cluster whose transaction
    /// ids are behind.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.prune.ticked")]
    /// # struct Ticked;
    /// #[derive(Aggregate, Serialize, Deserialize, Default)]
    /// #[aggregate(name = "doc.prune.clock", events(Ticked), snapshot_every = 10)]
    /// struct Clock { ticks: u64 }
    /// # impl Apply<Ticked> for Clock { fn apply(&mut self, _: &Ticked) { self.ticks += 1 } }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut ctx = store.begin();
    /// let mut clock = ctx.create::<Clock>()?;
    /// for _ in 0..25 {
    ///     ctx.apply(&mut clock, Ticked)?; // snapshots at 10 and 20
    /// }
    /// let id = clock.id();
    /// ctx.commit().await?;
    ///
    /// assert_eq!(store.prune_events(id).await?, 20);
    /// assert_eq!(store.history(id).await?.len(), 5);
    /// assert_eq!(store.begin_read_only().load::<Clock>(id).await?.ticks, 25);
    /// # Ok(()) }
    /// ```
    ///
    /// The history and the feed no longer hold the pruned events; readers of the feed go on
    /// past them. A change of the type's `snapshot_version` after a prune leaves loads without a
    /// snapshot to start from: they fail with [`Error::EventsPruned`] until a snapshot of the
    /// new shape is written (load the aggregate with the old code, or restore the events).
    ///
    /// Fails with [`Error::NotFound`] for an aggregate that does not exist, and
    /// [`Error::Config`] for one whose type is not in this program.
    pub async fn prune_events(&self, id: AggregateId) -> Result<u64> {
        self.writable()?;
        let (_, info) = self.pruned_aggregate(id).await?;
        self.inner
            .backend
            .prune(Prune::Events {
                id,
                snapshot_version: info.snapshot_version,
            })
            .await
    }

    /// Deletes aggregate `id`'s snapshots but the newest `keep` of its type's current snapshot
    /// shape (snapshots of another shape older than those go too); returns how many went. Its
    /// newest snapshot always stays, so loads after [`prune_events`](Store::prune_events) stay
    /// correct.
    ///
    /// Fails with [`Error::Config`] when `keep` is 0, and as `prune_events` does.
    pub async fn prune_snapshots(&self, id: AggregateId, keep: usize) -> Result<u64> {
        if keep == 0 {
            return Err(Error::Config(
                "prune_snapshots keeps at least the newest snapshot: keep must be 1 or more"
                    .to_owned(),
            ));
        }
        self.writable()?;
        let (_, info) = self.pruned_aggregate(id).await?;
        self.inner
            .backend
            .prune(Prune::Snapshots {
                id,
                snapshot_version: info.snapshot_version,
                keep: u64::try_from(keep).unwrap_or(u64::MAX),
            })
            .await
    }

    /// Deletes aggregate `id` on an erasure request: its events, its snapshots and its natural
    /// key, in one commit that writes an [`Erased`] tombstone (with `metadata`, say the
    /// request's reference) to the feed in their place. Returns the tombstone's cursor, or
    /// `None` when the aggregate was erased before (nothing is written then).
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use annals::{Erased, Filter};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.erase.registered")]
    /// # struct Registered { email: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.erase.customer", events(Registered))]
    /// # struct Customer;
    /// # impl Apply<Registered> for Customer { fn apply(&mut self, _: &Registered) {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut ctx = store.begin();
    /// let mut customer = ctx.create_with_key::<Customer>("ann@example.com").await?;
    /// ctx.apply(&mut customer, Registered { email: "ann@example.com".into() })?;
    /// let id = customer.id();
    /// ctx.commit().await?;
    ///
    /// store.erase(id, Metadata::new().reference("erasure-request-17")).await?;
    ///
    /// // The events are gone; the tombstone says so to every reader of the feed.
    /// let history = store.history(id).await?;
    /// assert_eq!(history.len(), 1);
    /// assert!(history[0].decode::<Erased>()?.is_some());
    /// // The aggregate is not found any more, and its key is free.
    /// let mut ctx = store.begin_read_only();
    /// assert!(matches!(ctx.load::<Customer>(id).await, Err(annals::Error::NotFound { .. })));
    /// assert!(ctx.find_by_key::<Customer>("ann@example.com").await?.is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// The aggregate's row stays, marked erased and without a key, so the tombstone keeps its
    /// aggregate type in the feed and the id is not given out again: loads answer
    /// [`Error::NotFound`], [`append`](Store::append) and
    /// [`create_with_id`](crate::Context::create_with_id) refuse the id. A context that loaded
    /// the aggregate before fails its commit with [`Error::Conflict`]. Feed readers and
    /// subscriptions go on past the deleted events, and receive the tombstone.
    ///
    /// The erasure takes whatever the aggregate holds when it commits: a commit that lands
    /// between its read and its write is erased with the rest, never a reason to fail.
    ///
    /// Fails with [`Error::NotFound`] for an aggregate that does not exist and
    /// [`Error::Config`] for one whose type is not in this program.
    pub async fn erase(&self, id: AggregateId, metadata: Metadata) -> Result<Option<FeedCursor>> {
        self.writable()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (row, info) = self.pruned_aggregate(id).await?;
            if row.erased {
                return Ok(None);
            }
            let batch = self.erasure(&row, info, &metadata)?;
            match self.inner.backend.commit(&batch).await {
                Ok(cursors) => {
                    if let Some(cache) = &self.inner.cache {
                        cache.evict(id);
                    }
                    return Ok(cursors.first().copied());
                }
                Err(Error::Conflict { .. }) if attempt < ERASE_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The commit that erases the aggregate of `row`: its tombstone, the release of its key,
    /// and the deletion of everything up to its version.
    fn erasure(
        &self,
        row: &AggregateRow,
        info: &AggregateInfo,
        metadata: &Metadata,
    ) -> Result<CommitBatch> {
        let payload = Erased::default().encode().map_err(|source| Error::Encode {
            what: "event",
            type_name: Erased::NAMES[0].to_owned(),
            source,
        })?;
        let tombstone = StagedEvent {
            seq: 1,
            version: row.version + 1,
            name: Erased::NAMES[0],
            schema_version: Erased::VERSION,
            payload,
            metadata: metadata.encode(),
            event_id: uuid::Uuid::now_v7(),
        };
        Ok(CommitBatch {
            changes: vec![Change {
                id: row.id,
                aggregate_type: info.name,
                key: None,
                is_new: false,
                expected: row.version,
                events: vec![tombstone],
                snapshot: None,
                // Released whatever key it has by then.
                rekey: Some(None),
                erase: true,
            }],
            loaded: Vec::new(),
            recorded_at: SystemTime::now(),
            inline: self.inner.options.inline.clone(),
            cursors: true,
        })
    }

    /// [`Error::ReadOnly`] on a read-only store.
    pub(crate) fn writable(&self) -> Result<()> {
        if self.inner.options.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// The row of aggregate `id` and its type's registration.
    async fn pruned_aggregate(&self, id: AggregateId) -> Result<(AggregateRow, &AggregateInfo)> {
        let Some(row) = self.inner.backend.locate(Locate::Id(id)).await? else {
            return Err(Error::NotFound {
                aggregate_type: "aggregate".to_owned(),
                target: Target::Id(id),
            });
        };
        let Some(info) = self.inner.registry.aggregate(&row.aggregate_type) else {
            return Err(Error::Config(format!(
                "aggregate {id} is a {:?}, a type this program does not register",
                row.aggregate_type
            )));
        };
        Ok((row, info))
    }
}
