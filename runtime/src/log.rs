//! The plain log: appending to an aggregate's stream at an expected version without loading it,
//! reading a stream by version range, page by page, and the feed's head.

use std::future::IntoFuture;
use std::ops::{Bound, Range, RangeBounds};
use std::time::SystemTime;

use crate::aggregate::{Aggregate, AggregateId};
use crate::context::{already_stored, check_size, event_ids};
use crate::error::{Error, Result};
use crate::event::{Event, FeedCursor, RecordedEvent};
use crate::filter::Filter;
use crate::metadata::Metadata;
use crate::retry::Retry;
use crate::store::{BoxFuture, Change, CommitBatch, Locate, StagedEvent, Store, StreamRange};

/// The version a stream must be at for [`Store::append`] to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// Whatever it is, the stream not existing included. Under contention the append is tried
    /// again at the new version, so the events still take consecutive versions.
    Any,
    /// The stream does not exist yet: the append creates it.
    NoStream,
    /// The stream is at exactly this version (`Exact(0)` is [`NoStream`](Self::NoStream)).
    Exact(u64),
}

/// An event to append with [`Store::append`]: encoded, with an optional id and metadata.
///
/// Every [`Event`] converts into one, so a list of one event type needs no wrapping:
/// `store.append::<Account>(id, ExpectedVersion::Any, [Deposited { amount: 5 }])`.
#[derive(Debug)]
pub struct NewEvent {
    name: &'static str,
    schema_version: u32,
    payload: Result<Vec<u8>>,
    metadata: Metadata,
    id: Option<uuid::Uuid>,
}

impl NewEvent {
    /// Encodes `event`. An event whose JSON does not decode back into it fails the append
    /// ([`Error::RoundTrip`]), as [`Context::apply`](crate::Context::apply) does.
    pub fn new<E: Event>(event: E) -> NewEvent {
        let name = event.name();
        let payload = event
            .encode()
            .map_err(|source| Error::Encode {
                what: "event",
                type_name: name.to_owned(),
                source,
            })
            .and_then(|payload| {
                E::decode(name, E::VERSION, &payload).map_err(|source| Error::RoundTrip {
                    type_name: name.to_owned(),
                    source,
                })?;
                Ok(payload)
            });
        NewEvent {
            name,
            schema_version: E::VERSION,
            payload,
            metadata: Metadata::default(),
            id: None,
        }
    }

    /// Stores the event under this id instead of a fresh UUID v7. An append whose ids are all
    /// stored already, for the same aggregate, is [already
    /// committed](Appended::already_committed): the retry of an append whose outcome was lost.
    pub fn with_id(mut self, id: uuid::Uuid) -> NewEvent {
        self.id = Some(id);
        self
    }

    /// Stores the event with this metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> NewEvent {
        self.metadata = metadata;
        self
    }
}

impl<E: Event> From<E> for NewEvent {
    fn from(event: E) -> NewEvent {
        NewEvent::new(event)
    }
}

/// What [`Store::append`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    aggregate: AggregateId,
    versions: Range<u64>,
    cursors: Vec<FeedCursor>,
    already: bool,
}

impl Appended {
    /// The aggregate appended to.
    pub fn aggregate(&self) -> AggregateId {
        self.aggregate
    }

    /// The versions the events were stored at, the first one's to the last one's (empty for an
    /// append of no events: `start` is then the version the next event would take).
    pub fn versions(&self) -> Range<u64> {
        self.versions.clone()
    }

    /// The stream's version after the append: its last event's.
    pub fn version(&self) -> u64 {
        self.versions.end.saturating_sub(1)
    }

    /// The events' places in the global feed, in the order given.
    pub fn cursors(&self) -> &[FeedCursor] {
        &self.cursors
    }

    /// True when nothing was written because every event's id was stored already, for this
    /// aggregate (see [`NewEvent::with_id`]).
    pub fn already_committed(&self) -> bool {
        self.already
    }
}

/// How many times an append at [`ExpectedVersion::Any`] is tried under contention.
const ANY_ATTEMPTS: u32 = 100;

impl Store {
    /// Appends `events` to aggregate `id`'s stream if it stands at `expected`, without loading
    /// the aggregate: no snapshot, no event is read, and no `Apply` runs. The events are
    /// written as one atomic commit (the store's inline projections run with it) and take
    /// consecutive versions; returns them with the events' cursors.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use annals::{ExpectedVersion, NewEvent, Metadata};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.log.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.log.deposited")]
    /// # struct Deposited { amount: i64 }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.log.account", events(Opened, Deposited))]
    /// # struct Account { balance: i64 }
    /// # impl Apply<Opened> for Account { fn apply(&mut self, _: &Opened) {} }
    /// # impl Apply<Deposited> for Account {
    /// #     fn apply(&mut self, e: &Deposited) { self.balance += e.amount }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let id = AggregateId::new();
    /// let opened = store
    ///     .append::<Account>(id, ExpectedVersion::NoStream, [
    ///         NewEvent::new(Opened { owner: "Ann".into() }),
    ///         NewEvent::new(Deposited { amount: 10 }).with_metadata(Metadata::new().reference("r-1")),
    ///     ])
    ///     .await?;
    /// assert_eq!(opened.versions(), 1..3);
    ///
    /// // One event type needs no wrapping.
    /// let next = store.append::<Account>(id, ExpectedVersion::Exact(2), [Deposited { amount: 5 }]).await?;
    /// assert_eq!(next.version(), 3);
    ///
    /// // A stale expected version writes nothing.
    /// let stale = store.append::<Account>(id, ExpectedVersion::Exact(2), [Deposited { amount: 1 }]).await;
    /// assert!(matches!(stale, Err(annals::Error::Conflict { expected: 2, actual: 3, .. })));
    /// assert_eq!(store.begin_read_only().load::<Account>(id).await?.balance, 15);
    /// # Ok(()) }
    /// ```
    ///
    /// It reads the aggregate's row (its type and version, not its events) before it writes,
    /// and the commit checks the version again, as a context's does. Fails with
    /// - [`Error::Conflict`] when the stream is not at `expected` (at [`ExpectedVersion::Any`],
    ///   only after many attempts under contention);
    /// - [`Error::IdTaken`] when `id` is an aggregate of another type;
    /// - [`Error::NotFound`] when it was erased ([`Store::erase`]);
    /// - [`Error::UnknownEventType`] for an event `A` does not list (its loads could not apply
    ///   it);
    /// - [`Error::ReadOnly`] on a read-only store, and the size errors of a context.
    ///
    /// Nothing is written then. An append of no events checks `expected` and writes nothing.
    pub async fn append<A: Aggregate>(
        &self,
        id: AggregateId,
        expected: ExpectedVersion,
        events: impl IntoIterator<Item = impl Into<NewEvent>>,
    ) -> Result<Appended> {
        self.writable()?;
        let (events, chosen_ids) = self.stage::<A>(events)?;
        let retry = Retry::attempts(ANY_ATTEMPTS);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let row = self.inner.backend.locate(Locate::Id(id)).await?;
            if let Some(row) = &row
                && row.erased
            {
                return Err(Error::NotFound {
                    aggregate_type: A::NAME.to_owned(),
                    target: crate::error::Target::Id(id),
                });
            }
            if let Some(row) = &row
                && row.aggregate_type != A::NAME
            {
                return Err(Error::IdTaken {
                    aggregate: id,
                    found_type: row.aggregate_type.clone(),
                });
            }
            let current = row.map(|r| r.version);
            let wanted = match expected {
                ExpectedVersion::Any => current,
                ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => None,
                ExpectedVersion::Exact(n) => Some(n),
            };
            let batch = self.append_batch::<A>(id, current, &events);
            if current != wanted {
                if chosen_ids && let Some(done) = self.appended_already(id, &batch).await {
                    return done;
                }
                return Err(Error::Conflict {
                    aggregate_type: A::NAME.to_owned(),
                    aggregate: id,
                    expected: wanted.unwrap_or(0),
                    actual: current.unwrap_or(0),
                });
            }
            let base = current.unwrap_or(0);
            let versions = base + 1..base + 1 + events.len() as u64;
            if events.is_empty() {
                return Ok(Appended {
                    aggregate: id,
                    versions,
                    cursors: Vec::new(),
                    already: false,
                });
            }
            batch.check_size(self.inner.options.max_commit_bytes)?;
            let span = crate::context::commit_span(&batch, false);
            let result =
                tracing::Instrument::instrument(self.inner.backend.commit(&batch), span).await;
            match result {
                Ok(cursors) => {
                    return Ok(Appended {
                        aggregate: id,
                        versions,
                        cursors,
                        already: false,
                    });
                }
                Err(e @ Error::CommitOutcomeUnknown { .. }) => return Err(e),
                Err(e) => {
                    if chosen_ids && let Some(done) = self.appended_already(id, &batch).await {
                        return done;
                    }
                    let moved = matches!(e, Error::Conflict { .. })
                        || (current.is_none() && matches!(e, Error::IdTaken { .. }));
                    if expected != ExpectedVersion::Any || !moved || attempt >= ANY_ATTEMPTS {
                        return Err(e);
                    }
                    tokio::time::sleep(retry.delay(attempt)).await;
                }
            }
        }
    }

    /// Checks and encodes the events of an append; true when the caller chose an id.
    fn stage<A: Aggregate>(
        &self,
        events: impl IntoIterator<Item = impl Into<NewEvent>>,
    ) -> Result<(Vec<StagedEvent>, bool)> {
        let max = self.inner.options.max_payload_bytes;
        let mut chosen_ids = false;
        let mut staged = Vec::new();
        for (seq, event) in (1..).zip(events) {
            let event: NewEvent = event.into();
            let payload = event.payload?;
            if A::handler(event.name).is_none() {
                return Err(Error::UnknownEventType {
                    event_type: event.name.to_owned(),
                    position: 0,
                    aggregate_type: Some(A::NAME.to_owned()),
                });
            }
            check_size("event", event.name, payload.len(), max)?;
            let metadata = event.metadata.encode();
            check_size(
                "metadata",
                event.name,
                metadata.as_ref().map_or(0, Vec::len),
                max,
            )?;
            chosen_ids |= event.id.is_some();
            staged.push(StagedEvent {
                seq,
                version: 0,
                name: event.name,
                schema_version: event.schema_version,
                payload,
                metadata,
                event_id: event.id.unwrap_or_else(uuid::Uuid::now_v7),
            });
        }
        Ok((staged, chosen_ids))
    }

    /// The commit of an append on a stream at `current` (`None`: it does not exist).
    fn append_batch<A: Aggregate>(
        &self,
        id: AggregateId,
        current: Option<u64>,
        events: &[StagedEvent],
    ) -> CommitBatch {
        let base = current.unwrap_or(0);
        let events = (base + 1..)
            .zip(events)
            .map(|(version, event)| StagedEvent {
                version,
                ..event.clone()
            })
            .collect();
        CommitBatch {
            changes: vec![Change {
                id,
                aggregate_type: A::NAME,
                key: None,
                is_new: current.is_none(),
                expected: base,
                events,
                snapshot: None,
                rekey: None,
                erase: false,
            }],
            loaded: Vec::new(),
            recorded_at: SystemTime::now(),
            inline: self.inner.options.inline.clone(),
            cursors: true,
        }
    }

    /// After a failed append with ids chosen by the caller: `Some` with what the stored ids say
    /// (as for a context's commit), and for an append stored already, its versions and cursors;
    /// `None` when none is stored.
    async fn appended_already(
        &self,
        id: AggregateId,
        batch: &CommitBatch,
    ) -> Option<Result<Appended>> {
        let ids = event_ids(batch);
        // One lookup: whether the append is stored, and at which versions. A failed lookup
        // leaves the append's own error standing.
        let found = self.inner.backend.find_events(&ids).await.ok()?;
        if let Err(e) = already_stored(batch, &found)? {
            return Some(Err(e));
        }
        let first = found.iter().map(|(_, _, v)| *v).min().unwrap_or(0);
        let last = found.iter().map(|(_, _, v)| *v).max().unwrap_or(0);
        let range = StreamRange {
            from: first,
            to: last,
            ..StreamRange::after(0)
        };
        let stored = match self.inner.backend.read_stream(id, range).await {
            Ok(stored) => stored,
            Err(e) => return Some(Err(e)),
        };
        let cursors = ids
            .iter()
            .filter_map(|event_id| stored.iter().find(|e| e.event_id == *event_id))
            .map(|e| e.cursor)
            .collect();
        Some(Ok(Appended {
            aggregate: id,
            versions: first..last + 1,
            cursors,
            already: true,
        }))
    }

    /// Reads aggregate `id`'s stream: every event, oldest first, unless the returned
    /// [`ReadStream`] narrows it. Await it for the events.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use annals::ExpectedVersion;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.read.ticked")]
    /// # struct Ticked;
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.read.clock", events(Ticked))]
    /// # struct Clock;
    /// # impl Apply<Ticked> for Clock { fn apply(&mut self, _: &Ticked) {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// # let id = AggregateId::new();
    /// # store.append::<Clock>(id, ExpectedVersion::Any, (0..10).map(|_| Ticked)).await?;
    /// let versions = |events: Vec<RecordedEvent>| events.iter().map(|e| e.version).collect::<Vec<_>>();
    /// // The newest three, newest first.
    /// assert_eq!(versions(store.read_stream(id).backward().limit(3).await?), [10, 9, 8]);
    /// // A range of versions.
    /// assert_eq!(versions(store.read_stream(id).versions(4..=6).await?), [4, 5, 6]);
    /// // A history page by page.
    /// let mut after = 0;
    /// loop {
    ///     let page = store.read_stream(id).versions(after + 1..).limit(4).await?;
    ///     let Some(last) = page.last() else { break };
    ///     after = last.version;
    /// }
    /// assert_eq!(after, 10);
    /// # Ok(()) }
    /// ```
    pub fn read_stream(&self, id: AggregateId) -> ReadStream<'_> {
        ReadStream {
            store: self,
            id,
            range: StreamRange::after(0),
        }
    }

    /// The cursor of the newest event the feed can be read up to now, without reading events:
    /// a reader that starts there sees only what is committed after. On PostgreSQL it stays
    /// behind a transaction that holds the feed back (see [`read_feed`](Store::read_feed)),
    /// so nothing that commits late is skipped by starting from it. [`FeedCursor::START`] on
    /// an empty store.
    pub async fn feed_head(&self) -> Result<FeedCursor> {
        // A read that matches nothing looks as far as the feed can be read now. (Should an
        // aggregate have the nil id, its events are read past one at a time.)
        let nothing = Filter::all().aggregate(AggregateId::from(uuid::Uuid::nil()));
        let mut after = FeedCursor::START;
        loop {
            let page = self
                .inner
                .backend
                .read_feed_matching(after, 1, &nothing)
                .await?;
            match page.last() {
                Some(event) => after = event.cursor,
                None => return Ok(page.scanned.max(after)),
            }
        }
    }
}

/// A read of one aggregate's stream (see [`Store::read_stream`]): a version range, a direction
/// and a limit. Await it for the events.
#[derive(Debug, Clone)]
#[must_use = "a stream read does nothing until it is awaited"]
pub struct ReadStream<'s> {
    store: &'s Store,
    id: AggregateId,
    range: StreamRange,
}

impl ReadStream<'_> {
    /// Only the events whose versions lie in `versions` (`3..=7`, `10..`, `..=4`).
    pub fn versions(mut self, versions: impl RangeBounds<u64>) -> Self {
        self.range.from = match versions.start_bound() {
            Bound::Included(v) => *v,
            Bound::Excluded(v) => v.saturating_add(1),
            Bound::Unbounded => 0,
        };
        self.range.to = match versions.end_bound() {
            Bound::Included(v) => *v,
            Bound::Excluded(v) => match v.checked_sub(1) {
                Some(v) => v,
                // `..0`: nothing.
                None => {
                    self.range.from = 1;
                    0
                }
            },
            Bound::Unbounded => u64::MAX,
        };
        self
    }

    /// Oldest first (the default).
    pub fn forward(mut self) -> Self {
        self.range.backward = false;
        self
    }

    /// Newest first.
    pub fn backward(mut self) -> Self {
        self.range.backward = true;
        self
    }

    /// At most `limit` events: the first ones in the read's direction.
    pub fn limit(mut self, limit: usize) -> Self {
        self.range.limit = u64::try_from(limit).unwrap_or(u64::MAX);
        self
    }
}

impl<'s> IntoFuture for ReadStream<'s> {
    type Output = Result<Vec<RecordedEvent>>;
    type IntoFuture = BoxFuture<'s, Result<Vec<RecordedEvent>>>;

    fn into_future(self) -> Self::IntoFuture {
        if self.range.limit == 0 || self.range.from > self.range.to {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        self.store.inner.backend.read_stream(self.id, self.range)
    }
}
