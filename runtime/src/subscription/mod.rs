//! Durable subscriptions: a named reader of the feed whose cursor is kept in the store, written
//! in the same transaction as its handler's own writes.

mod admin;
pub(crate) mod inline;
mod projection;
pub(crate) mod row;
pub(crate) mod tx;
mod worker;

use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{BoxError, Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::filter::Filter;
use crate::store::Store;

pub use admin::{
    Lag, ParkedEvent, ParkedRequest, SubscriptionState, SubscriptionStatus, Subscriptions,
};
pub use inline::{InlineProjection, SqlBatch};
pub use projection::{Envelope, On, Projection};
use row::{Row, Spec, Write};
pub use tx::{SqlValue, Transaction};

/// Where a durable subscription starts, the first time it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Start {
    /// Every event in the store.
    #[default]
    Beginning,
    /// Only events committed after the subscription is first opened. On PostgreSQL the end
    /// is where the feed can be read to at that moment: while a transaction that began earlier
    /// is still open, the events committed since it began come too (never fewer).
    End,
    /// The events after this cursor.
    After(FeedCursor),
    /// The events from the first one recorded at or after this time, in feed order. Found
    /// by reading the feed from the beginning, once, when the subscription is first opened.
    At(#[serde(with = "micros")] SystemTime),
}

/// A time as microseconds since the Unix epoch, as stored.
mod micros {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let micros = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        micros.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let micros = u64::deserialize(d)?;
        Ok(UNIX_EPOCH
            .checked_add(Duration::from_micros(micros))
            .unwrap_or(UNIX_EPOCH))
    }
}

impl Start {
    fn text(self) -> String {
        serde_json::to_string(&self).unwrap_or_default()
    }
}

/// What a subscription does with an event its handler keeps failing on, after the retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnFailure {
    /// Stop the subscription at the event: its state becomes failed, with the error and the
    /// event's cursor stored, until it is resumed.
    #[default]
    Stop,
    /// Park the event (stored with its error; see [`Subscriptions::parked`]) and go on. The
    /// later events of its aggregate wait behind it, so each aggregate's events are still
    /// handled in order, until an operator retries or skips it
    /// ([`Subscriptions::retry_parked`], [`Subscriptions::skip_parked`]); other aggregates go
    /// on.
    Park,
}

/// What a durable subscription does with each batch of events. The batch's checkpoint commits
/// in `tx` after `handle` returns `Ok`: write the read model through `tx`, and its rows and the
/// subscription's cursor commit together (see [`Transaction`]).
///
/// ```
/// use annals::{BoxError, RecordedEvent, Transaction, subscription::Handler};
///
/// /// Counts events per type in a table.
/// struct Counts;
///
/// impl Handler for Counts {
///     async fn handle(
///         &mut self,
///         events: &[RecordedEvent],
///         tx: &mut Transaction<'_>,
///     ) -> Result<(), BoxError> {
///         for event in events {
///             tx.execute(
///                 "INSERT INTO event_counts (event_type, n) VALUES ($1, 1) \
///                  ON CONFLICT (event_type) DO UPDATE SET n = event_counts.n + 1",
///                 &[event.event_type.as_str().into()],
///             )
///             .await?;
///         }
///         Ok(())
///     }
///
///     async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
///         tx.execute("DELETE FROM event_counts", &[]).await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send {
    /// Handles `events`, in feed order. An error rolls `tx` back and the batch is tried again
    /// (see [`Subscription::retries`]).
    fn handle(
        &mut self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'_>,
    ) -> impl Future<Output = std::result::Result<(), BoxError>> + Send;

    /// Clears what the handler built, in the transaction that moves the subscription back to its
    /// start ([`Subscription::reset`]). Does nothing unless implemented.
    fn reset(
        &mut self,
        tx: &mut Transaction<'_>,
    ) -> impl Future<Output = std::result::Result<(), BoxError>> + Send {
        let _ = tx;
        async { Ok(()) }
    }
}

/// A durable subscription: a named reader of the global feed whose cursor is kept in the store.
///
/// Build it with [`Store::subscription`], then [`run`](Subscription::run) a [`Handler`]. Events
/// are delivered at least once, in feed order (so each aggregate's in version order), in
/// batches; the cursor is written in the handler's transaction, so effects written through
/// it happen exactly once. The filter runs in the store's query. A partition (see
/// [`partitions`](Subscription::partitions)) has one worker at a time: a worker holds a lease
/// (owner, expiry, fencing token) on it, renewed as it works; a worker whose lease was taken
/// over cannot write its checkpoint ([`Error::LeaseLost`]), and its transaction rolls back. So
/// several processes may run the same subscription: they share its partitions evenly, and take
/// over the partitions of one that stops or dies.
///
/// A batch that fails (the handler returns an error or panics) is tried again with
/// exponential backoff; when it keeps failing it is split to find the event, the events before
/// it are checkpointed, and [`OnFailure`] decides: stop at that event (its state becomes failed,
/// with the error and the event's cursor stored, see [`Subscriptions`], and
/// [`run`](Subscription::run) returns [`Error::SubscriptionFailed`]), or park it and go on.
/// Nothing is ever skipped silently.
///
/// ```no_run
/// # use annals::prelude::*;
/// # use annals::{BoxError, Filter, RecordedEvent, Transaction};
/// # use annals::subscription::{Handler, Start};
/// # struct Balances;
/// # impl Handler for Balances {
/// #     async fn handle(&mut self, _: &[RecordedEvent], _: &mut Transaction<'_>) -> Result<(), BoxError> { Ok(()) }
/// # }
/// # async fn demo(store: Store) -> Result<(), annals::Error> {
/// let balances = store
///     .subscription("balances")
///     .filter(Filter::all().aggregate_type_named("account"))
///     .start(Start::Beginning)
///     .batch_size(200);
/// // Resolves on shutdown: a signal, a `CancellationToken`, a channel.
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let shutdown = async { stopped.await.ok(); };
/// balances.run(&mut Balances, shutdown).await?; // until `stop` is sent or dropped
/// # drop(stop);
/// # Ok(()) }
/// ```
///
/// A clone is the same worker (one owner of leases): to run several workers in one process,
/// build each with [`Store::subscription`].
#[derive(Debug, Clone)]
pub struct Subscription {
    store: Store,
    name: String,
    filter: Filter,
    start: Start,
    batch_size: usize,
    partitions: u32,
    on_failure: OnFailure,
    poll_interval: Option<Duration>,
    lease: Duration,
    max_attempts: u32,
    first_backoff: Duration,
    max_backoff: Duration,
    owner: String,
}

impl Store {
    /// A durable subscription named `name` (any text; its identity in the store), reading every
    /// event from the beginning until configured otherwise.
    pub fn subscription(&self, name: &str) -> Subscription {
        Subscription {
            store: self.clone(),
            name: name.to_owned(),
            filter: Filter::all(),
            start: Start::Beginning,
            batch_size: 100,
            partitions: 1,
            on_failure: OnFailure::Stop,
            poll_interval: None,
            lease: Duration::from_secs(30),
            max_attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            owner: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7()),
        }
    }
}

impl Subscription {
    /// The events to deliver (default: all). Stored at the first open; a later open with another
    /// filter is refused ([`Error::SubscriptionMismatch`]) until the subscription is reset.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Where to start the first time (default: the beginning). Stored like the filter.
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// Events per batch, at least 1 (default 100).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Splits the subscription into `partitions` (1 to 256; default 1) by aggregate: each
    /// aggregate's events fall in one partition (by the last byte of its id), so they stay in
    /// order, and each partition has its own cursor and lease. The live workers share the
    /// partitions evenly: one that joins takes its share within a lease period, the partitions
    /// of one that stops are taken at once, and those of one that dies when its lease expires.
    /// Stored at the first open like the filter; it cannot change later (reset keeps it), so
    /// re-partition under a new name.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// How often a caught-up worker reads the feed when no wake-up came (default: the store's
    /// [`StoreOptions::poll_interval`](crate::StoreOptions::poll_interval)).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = Some(every);
        self
    }

    /// How long a worker's lease on a partition lasts (default 30 s). The worker renews it
    /// every third of that, in the background while its handler works, and with every
    /// checkpoint: a worker that stops renewing (a paused or dead process) loses its
    /// partitions to the others after this long, and cannot write the batch it had in hand.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(10));
        self
    }

    /// How often a failing batch is tried in all (default 5, at least 1), and the first pause
    /// between tries (default 100 ms), doubled after each try up to 30 s.
    pub fn retries(mut self, max_attempts: u32, first_backoff: Duration) -> Self {
        self.max_attempts = max_attempts.max(1);
        self.first_backoff = first_backoff;
        self
    }

    /// What to do with an event the handler keeps failing on (default: stop).
    pub fn on_failure(mut self, policy: OnFailure) -> Self {
        self.on_failure = policy;
        self
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the subscription in the store if it does not exist, or checks that it was created
    /// with this filter and start ([`Error::SubscriptionMismatch`] when not). [`run`] and
    /// [`catch_up`] open it first; calling it alone registers the subscription, so that
    /// [`Start::End`] counts from now.
    ///
    /// [`run`]: Subscription::run
    /// [`catch_up`]: Subscription::catch_up
    pub async fn open(&self) -> Result<()> {
        self.filter.check()?;
        if !(1..=256).contains(&self.partitions) {
            return Err(Error::Config(format!(
                "subscription {:?}: {} partitions; a subscription has 1 to 256",
                self.name, self.partitions
            )));
        }
        let spec = Spec {
            name: self.name.clone(),
            filter: self.filter.to_json(),
            start: self.start.text(),
            partitions: self.partitions,
            initial: self.initial_cursor().await?,
        };
        let row = self.store.inner.backend.subscription_open(&spec).await?;
        let (stored_partitions, given_partitions) =
            (row.partitions.to_string(), spec.partitions.to_string());
        for (setting, stored, given) in [
            ("filter", &row.filter, &spec.filter),
            ("start", &row.start, &spec.start),
            ("partitions", &stored_partitions, &given_partitions),
        ] {
            if stored != given {
                return Err(Error::SubscriptionMismatch {
                    name: self.name.clone(),
                    setting,
                    stored: stored.clone(),
                    given: given.clone(),
                });
            }
        }
        Ok(())
    }

    /// The cursor [`Start`] names, now.
    async fn initial_cursor(&self) -> Result<FeedCursor> {
        Ok(match self.start {
            Start::Beginning => FeedCursor::START,
            Start::After(cursor) => cursor,
            Start::End => self.store.feed_head().await?,
            Start::At(time) => self.cursor_before(time).await?,
        })
    }

    /// The cursor of the last event before the first one recorded at or after `time` (as far as
    /// the feed can be read now).
    async fn cursor_before(&self, time: SystemTime) -> Result<FeedCursor> {
        const PAGE: usize = 1000;
        let mut cursor = FeedCursor::START;
        loop {
            let page = self.store.read_feed(cursor, PAGE).await?;
            for event in &page {
                if event.recorded_at >= time {
                    return Ok(cursor);
                }
                cursor = event.cursor;
            }
            if page.len() < PAGE {
                return Ok(cursor);
            }
        }
    }

    /// Delivers events to `handler` until `shutdown` resolves, then finishes the batch in
    /// flight, releases the lease and returns `Ok`. Caught up, it waits for new commits (woken
    /// as [`Store::wait_for_events`] is). Returns an error when the subscription stops
    /// ([`Error::SubscriptionFailed`], or one already failed) or the store fails; a paused
    /// subscription is waited on until it is resumed.
    pub async fn run<H: Handler>(
        &self,
        handler: &mut H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        self.work(handler, shutdown, false).await.map(|_| ())
    }

    /// Delivers every event there is now to `handler`, then returns how many it delivered:
    /// for tests, batch jobs and rebuilds. It takes every partition no other worker holds, and
    /// returns at once with 0 when they all are held, or the subscription is paused. While the
    /// feed is held back by an open transaction (PostgreSQL), it waits for it to end.
    pub async fn catch_up<H: Handler>(&self, handler: &mut H) -> Result<u64> {
        self.work(handler, std::future::pending(), true).await
    }

    /// Moves the subscription back to its start (with this filter and start, which become the
    /// stored ones), after `handler`'s [`reset`](Handler::reset) clears its read model, in one
    /// transaction. A worker still running on the old cursor loses its lease: its next
    /// checkpoint is refused and rolled back, and it goes on from the new cursor.
    pub async fn reset<H: Handler>(&self, handler: &mut H) -> Result<()> {
        self.filter.check()?;
        self.open_or_mismatch().await?;
        let stored = self
            .store
            .inner
            .backend
            .subscription_rows(Some(&self.name))
            .await?;
        if let Some(row) = stored.first()
            && row.partitions != self.partitions
        {
            return Err(Error::SubscriptionMismatch {
                name: self.name.clone(),
                setting: "partitions",
                stored: row.partitions.to_string(),
                given: self.partitions.to_string(),
            });
        }
        let backend = &self.store.inner.backend;
        let mut state = backend.begin_tx().await?;
        handler
            .reset(&mut Transaction { state: &mut state })
            .await
            .map_err(|e| Error::Config(format!("the handler's reset failed: {e}")))?;
        let write = Write::Reset {
            name: self.name.clone(),
            filter: self.filter.to_json(),
            start: self.start.text(),
            cursor: self.initial_cursor().await?,
        };
        backend.commit_tx(state, vec![write]).await
    }

    /// [`open`](Subscription::open), where a mismatch of filter or start is no error (reset
    /// writes them).
    async fn open_or_mismatch(&self) -> Result<()> {
        match self.open().await {
            Ok(()) => Ok(()),
            Err(Error::SubscriptionMismatch { setting, .. }) if setting != "partitions" => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The error of a subscription found failed.
fn failed(row: &Row) -> Error {
    Error::SubscriptionFailed {
        name: row.name.clone(),
        cursor: row
            .error_cursor
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or(row.cursor),
        attempts: row.attempts,
        message: row.last_error.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::row::cursor_text;
    use super::*;

    #[test]
    fn starts_are_stored_as_json() {
        assert_eq!(Start::Beginning.text(), "\"Beginning\"");
        let after = Start::After(FeedCursor::at_position(7));
        let back: Start = serde_json::from_str(&after.text()).unwrap();
        assert_eq!(back, after);
        assert_eq!(
            cursor_text(FeedCursor::START),
            r#"{"epoch":0,"tx":0,"position":0}"#
        );
    }
}
