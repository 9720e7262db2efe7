//! Durable subscriptions: a named reader of the feed whose cursor is kept in the store, written
//! in the same transaction as its handler's own writes.

mod admin;
pub(crate) mod row;
pub(crate) mod tx;

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::aggregate::AggregateId;
use crate::error::{BoxError, Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::filter::Filter;
use crate::store::{HELD_BACK_FIRST_PAUSE, Store};

pub use admin::{Lag, SubscriptionState, SubscriptionStatus, Subscriptions};
use row::{Claim, Lease, Row, Spec, Write};
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
}

impl Start {
    fn text(self) -> String {
        serde_json::to_string(&self).unwrap_or_default()
    }
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
/// it happen exactly once. The filter runs in the store's query. A partition has one worker at
/// a time: a worker holds a lease (owner, expiry, fencing token) on it, renewed as it works; a
/// worker whose lease was taken over cannot write its checkpoint ([`Error::LeaseLost`]), and its
/// transaction rolls back. So several processes may run the same subscription: one works, the
/// others wait and take over when its lease expires.
///
/// A batch that fails is tried again with exponential backoff; when it keeps failing it is
/// split to find the event, the events before it are checkpointed, and the subscription stops
/// at that event: its state becomes failed, with the error and the event's cursor stored (see
/// [`Subscriptions`]), and [`run`](Subscription::run) returns [`Error::SubscriptionFailed`].
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
#[derive(Debug, Clone)]
pub struct Subscription {
    store: Store,
    name: String,
    filter: Filter,
    start: Start,
    batch_size: usize,
    poll_interval: Option<Duration>,
    lease: Duration,
    max_attempts: u32,
    first_backoff: Duration,
    max_backoff: Duration,
    owner: String,
}

/// How a batch attempt failed.
enum Failure {
    /// The handler (or its SQL) failed: worth another attempt.
    Handler(String),
    /// The lease is gone, or the store failed: stop delivering this batch.
    Stop(Error),
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

    /// How often a caught-up worker reads the feed when no wake-up came (default: the store's
    /// [`StoreOptions::poll_interval`](crate::StoreOptions::poll_interval)).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = Some(every);
        self
    }

    /// How long a worker's lease on a partition lasts (default 30 s). The worker renews it
    /// between batches and with every checkpoint; a batch that takes longer than this may be
    /// taken over by another worker, and is then rolled back and delivered again there.
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
        let spec = Spec {
            name: self.name.clone(),
            filter: self.filter.to_json(),
            start: self.start.text(),
            partitions: 1,
            initial: self.initial_cursor().await?,
        };
        let row = self.store.inner.backend.subscription_open(&spec).await?;
        for (setting, stored, given) in [
            ("filter", &row.filter, &spec.filter),
            ("start", &row.start, &spec.start),
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
            Start::End => {
                // A read that matches nothing looks as far as the feed can be read now.
                let nothing = Filter::all().aggregate(AggregateId::from(uuid::Uuid::nil()));
                self.store
                    .read_feed_matching(FeedCursor::START, 1, &nothing)
                    .await?
                    .scanned
            }
        })
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
    /// for tests, batch jobs and rebuilds. Returns at once with 0 when another worker holds the
    /// lease, or the subscription is paused.
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
        backend.commit_tx(state, write).await
    }

    /// [`open`](Subscription::open), where a mismatch is no error (reset writes the settings).
    async fn open_or_mismatch(&self) -> Result<()> {
        match self.open().await {
            Ok(()) | Err(Error::SubscriptionMismatch { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// This worker's claim on the partition.
    fn claim(&self) -> Claim {
        Claim {
            name: self.name.clone(),
            partition: 0,
            owner: self.owner.clone(),
            lease: self.lease,
        }
    }

    fn lease_of(&self, token: u64) -> Lease {
        Lease {
            name: self.name.clone(),
            partition: 0,
            owner: self.owner.clone(),
            token,
            duration: self.lease,
        }
    }

    /// The worker loop of [`run`](Subscription::run) and [`catch_up`](Subscription::catch_up).
    async fn work<H: Handler>(
        &self,
        handler: &mut H,
        shutdown: impl Future<Output = ()> + Send,
        until_caught_up: bool,
    ) -> Result<u64> {
        self.open().await?;
        let mut shutdown = pin!(shutdown.fuse());
        let backend = &self.store.inner.backend;
        let poll = self
            .poll_interval
            .unwrap_or(self.store.inner.options.poll_interval);
        let renew_every = self.lease / 3;
        let claim = self.claim();
        let mut held: Option<(u64, FeedCursor, tokio::time::Instant)> = None;
        let mut delivered = 0u64;
        let mut held_pause = HELD_BACK_FIRST_PAUSE.min(poll);
        // Set to read the partition's row again before the next batch (a paused subscription).
        let mut recheck = false;
        loop {
            if (&mut shutdown).now_or_never().is_some() {
                self.release(&held).await;
                return Ok(delivered);
            }
            // Claim the partition, or renew the lease held.
            if recheck || held.is_none_or(|(_, _, at)| at.elapsed() >= renew_every) {
                recheck = false;
                match backend.subscription_claim(&claim).await? {
                    Some(row) => {
                        let cursor = match held {
                            // Still ours: the cursor in hand is at least as new as the stored.
                            Some((token, cursor, _)) if token == row.token => cursor,
                            _ => row.cursor,
                        };
                        held = Some((row.token, cursor, tokio::time::Instant::now()));
                        match row.state.as_str() {
                            "failed" => return Err(failed(&row)),
                            "paused" => {
                                if until_caught_up {
                                    return Ok(delivered);
                                }
                                self.pause(&mut shutdown, poll.min(renew_every)).await;
                                recheck = true;
                                continue;
                            }
                            _ => {}
                        }
                    }
                    None => {
                        held = None;
                        if until_caught_up {
                            return Ok(delivered);
                        }
                        self.pause(&mut shutdown, poll.min(renew_every)).await;
                        continue;
                    }
                }
            }
            let Some((token, cursor, renewed)) = held else {
                continue;
            };
            let since = backend.changes();
            let page = self
                .store
                .read_feed_matching(cursor, self.batch_size, &self.filter)
                .await?;
            if page.is_empty() {
                if page.scanned > cursor {
                    // Nothing matched: move past what was looked at, so it is not read again.
                    match self.checkpoint_only(token, cursor, page.scanned).await {
                        Ok(()) => held = Some((token, page.scanned, tokio::time::Instant::now())),
                        Err(Error::LeaseLost { .. }) => held = None,
                        Err(e) => return Err(e),
                    }
                }
                let wait = if page.held_back.is_some() {
                    let pause = held_pause;
                    held_pause = held_pause.saturating_mul(2).min(poll);
                    pause
                } else {
                    if until_caught_up {
                        self.release(&held).await;
                        return Ok(delivered);
                    }
                    held_pause = HELD_BACK_FIRST_PAUSE.min(poll);
                    poll
                };
                let wait = wait.min(renew_every.saturating_sub(renewed.elapsed()));
                tokio::select! {
                    () = &mut shutdown => {
                        self.release(&held).await;
                        return Ok(delivered);
                    }
                    () = backend.wait_for_change(since, wait) => {}
                }
                continue;
            }
            let count = page.len() as u64;
            let span = tracing::info_span!(
                "annals.subscription.batch",
                subscription = %self.name,
                partition = 0,
                events = count,
                from = ?page.first().map(|e| e.cursor),
                to = ?page.scanned,
            );
            match self
                .deliver(handler, &page.events, cursor, page.scanned, token)
                .instrument(span)
                .await
            {
                Ok(()) => {
                    delivered += count;
                    held = Some((token, page.scanned, tokio::time::Instant::now()));
                }
                Err(Error::LeaseLost { .. }) => {
                    tracing::info!(subscription = %self.name, "lease lost; claiming again");
                    held = None;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sleeps `wait`, or until shutdown (which the loop then sees).
    async fn pause(
        &self,
        shutdown: &mut std::pin::Pin<&mut futures_util::future::Fuse<impl Future<Output = ()>>>,
        wait: Duration,
    ) {
        tokio::select! {
            () = &mut *shutdown => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Gives up the lease held, if any, so another worker can claim the partition at once.
    async fn release(&self, held: &Option<(u64, FeedCursor, tokio::time::Instant)>) {
        let Some((token, _, _)) = held else {
            return;
        };
        let backend = &self.store.inner.backend;
        let released = async {
            let state = backend.begin_tx().await?;
            let write = Write::Release {
                lease: self.lease_of(*token),
            };
            backend.commit_tx(state, write).await
        };
        if let Err(e) = released.await {
            tracing::warn!(subscription = %self.name, error = %e, "could not release the lease");
        }
    }

    /// Moves the cursor from `from` past events that did not match, to `cursor`.
    async fn checkpoint_only(
        &self,
        token: u64,
        from: FeedCursor,
        cursor: FeedCursor,
    ) -> Result<()> {
        let backend = &self.store.inner.backend;
        let state = backend.begin_tx().await?;
        let write = Write::Checkpoint {
            lease: self.lease_of(token),
            from,
            cursor,
        };
        backend.commit_tx(state, write).await
    }

    /// Delivers one batch, with retries; when it keeps failing, event by event, to checkpoint
    /// the events before the one that fails and stop there.
    async fn deliver<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        from: FeedCursor,
        through: FeedCursor,
        token: u64,
    ) -> Result<()> {
        let message = match self
            .with_retries(handler, events, from, through, token)
            .await?
        {
            None => return Ok(()),
            Some(message) => message,
        };
        let Some(first) = events.first() else {
            return Ok(());
        };
        if events.len() == 1 {
            return self.fail(token, first.cursor, message).await;
        }
        let mut from = from;
        for (index, event) in events.iter().enumerate() {
            let upto = if index + 1 == events.len() {
                through
            } else {
                event.cursor
            };
            let one = std::slice::from_ref(event);
            if let Some(message) = self.with_retries(handler, one, from, upto, token).await? {
                return self.fail(token, event.cursor, message).await;
            }
            from = upto;
        }
        Ok(())
    }

    /// Tries a batch up to `max_attempts` times; `Ok(Some(error))` when every try failed.
    async fn with_retries<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        from: FeedCursor,
        through: FeedCursor,
        token: u64,
    ) -> Result<Option<String>> {
        let mut backoff = self.first_backoff;
        for attempt in 1..=self.max_attempts {
            match self.attempt(handler, events, from, through, token).await {
                Ok(()) => return Ok(None),
                Err(Failure::Stop(e)) => return Err(e),
                Err(Failure::Handler(message)) => {
                    tracing::warn!(
                        subscription = %self.name,
                        attempt,
                        events = events.len(),
                        error = %message,
                        "handler failed"
                    );
                    // A batch another worker has checkpointed meanwhile is not this one's to
                    // retry, nor to fail on: its writes would find that worker's.
                    self.still_at(from, token).await?;
                    if attempt == self.max_attempts {
                        return Ok(Some(message));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(self.max_backoff);
                }
            }
        }
        Ok(None)
    }

    /// [`Error::LeaseLost`] unless this worker still holds the lease `token` with the cursor at
    /// `from`.
    async fn still_at(&self, from: FeedCursor, token: u64) -> Result<()> {
        match self
            .store
            .inner
            .backend
            .subscription_claim(&self.claim())
            .await?
        {
            Some(row) if row.token == token && row.cursor == from => Ok(()),
            _ => Err(Error::LeaseLost {
                name: self.name.clone(),
                partition: 0,
                token,
            }),
        }
    }

    /// One try: the handler in a fresh transaction, then the checkpoint in it, from `from` to
    /// `through`.
    async fn attempt<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        from: FeedCursor,
        through: FeedCursor,
        token: u64,
    ) -> std::result::Result<(), Failure> {
        let backend = &self.store.inner.backend;
        let mut state = backend.begin_tx().await.map_err(Failure::Stop)?;
        handler
            .handle(events, &mut Transaction { state: &mut state })
            .await
            .map_err(|e| Failure::Handler(e.to_string()))?;
        let write = Write::Checkpoint {
            lease: self.lease_of(token),
            from,
            cursor: through,
        };
        match backend.commit_tx(state, write).await {
            Ok(()) => Ok(()),
            Err(e @ Error::LeaseLost { .. }) => Err(Failure::Stop(e)),
            // The handler's own SQL runs at commit on SQLite: its failure is the handler's.
            Err(e) => Err(Failure::Handler(e.to_string())),
        }
    }

    /// Stops the subscription at the event at `at`, storing the error.
    async fn fail(&self, token: u64, at: FeedCursor, message: String) -> Result<()> {
        let backend = &self.store.inner.backend;
        let state = backend.begin_tx().await?;
        let write = Write::Fail {
            lease: self.lease_of(token),
            at,
            attempts: self.max_attempts,
            error: message.clone(),
        };
        backend.commit_tx(state, write).await?;
        tracing::error!(subscription = %self.name, cursor = ?at, error = %message, "subscription stopped");
        Err(Error::SubscriptionFailed {
            name: self.name.clone(),
            cursor: at,
            attempts: self.max_attempts,
            message,
        })
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
