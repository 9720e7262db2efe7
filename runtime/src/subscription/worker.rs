//! The worker loop of a durable subscription: claim a fair share of its partitions, deliver
//! each partition's batches with retries, checkpoint under the lease, give partitions back.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::{Pin, pin};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::Fuse;
use tracing::Instrument;

use super::row::{Claim, Lease, Parked, Write, cursor_text};
use super::{Handler, OnFailure, Subscription, Transaction, failed};
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::store::HELD_BACK_FIRST_PAUSE;

/// A partition this worker holds: its fencing token, the cursor it has reached, the
/// aggregates whose events it holds back behind a parked one, and the parked events an operator
/// asked to retry or skip.
#[derive(Debug, Clone)]
struct Held {
    token: u64,
    cursor: FeedCursor,
    parked: HashSet<AggregateId>,
    replays: Vec<Parked>,
}

impl Held {
    fn new(token: u64, cursor: FeedCursor) -> Held {
        Held {
            token,
            cursor,
            parked: HashSet::new(),
            replays: Vec::new(),
        }
    }
}

/// The lease a write is made under: a partition and the token this worker holds on it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    partition: u32,
    token: u64,
}

/// What one pass over the held partitions did.
#[derive(Debug, Default)]
struct Pass {
    delivered: u64,
    held_back: bool,
    lost: Vec<u32>,
}

/// How a batch attempt failed.
enum Failure {
    /// The handler (or its SQL) failed: worth another attempt.
    Handler(String),
    /// The lease is gone, or the store failed: stop delivering this batch.
    Stop(Error),
}

type Shutdown<'s, F> = Pin<&'s mut Fuse<F>>;

impl Subscription {
    /// The worker loop of [`run`](Subscription::run) and [`catch_up`](Subscription::catch_up):
    /// `greedy` (catch-up) takes every free partition and returns once they are caught up.
    pub(super) async fn work<H: Handler>(
        &self,
        handler: &mut H,
        shutdown: impl Future<Output = ()> + Send,
        greedy: bool,
    ) -> Result<u64> {
        self.open().await?;
        let mut shutdown = pin!(shutdown.fuse());
        let mut held = BTreeMap::new();
        let result = self
            .work_on(handler, &mut shutdown, &mut held, greedy)
            .await;
        self.leave(&held, greedy).await;
        result
    }

    async fn work_on<H: Handler, F: Future<Output = ()>>(
        &self,
        handler: &mut H,
        shutdown: &mut Shutdown<'_, F>,
        held: &mut BTreeMap<u32, Held>,
        greedy: bool,
    ) -> Result<u64> {
        let backend = &self.store.inner.backend;
        let poll = self
            .poll_interval
            .unwrap_or(self.store.inner.options.poll_interval);
        let renew_every = self.lease / 3;
        let mut balanced: Option<tokio::time::Instant> = None;
        let mut delivered = 0u64;
        let mut held_pause = HELD_BACK_FIRST_PAUSE.min(poll);
        loop {
            if shutdown.as_mut().now_or_never().is_some() {
                return Ok(delivered);
            }
            if balanced.is_none_or(|at| at.elapsed() >= renew_every) {
                let paused = self.rebalance(held, greedy).await?;
                balanced = Some(tokio::time::Instant::now());
                if paused {
                    if greedy {
                        return Ok(delivered);
                    }
                    self.pause(shutdown, poll.min(renew_every)).await;
                    balanced = None;
                    continue;
                }
            }
            if held.is_empty() {
                if greedy {
                    return Ok(delivered);
                }
                // Every partition is another worker's: look again later.
                self.pause(shutdown, poll.min(renew_every)).await;
                balanced = None;
                continue;
            }
            let since = backend.changes();
            let pass = self.pass(handler, held).await?;
            delivered += pass.delivered;
            if !pass.lost.is_empty() {
                tracing::info!(subscription = %self.name, lost = ?pass.lost, "leases lost; claiming again");
                for partition in &pass.lost {
                    held.remove(partition);
                }
                balanced = None;
            }
            if pass.delivered > 0 {
                held_pause = HELD_BACK_FIRST_PAUSE.min(poll);
                continue;
            }
            let wait = if pass.held_back {
                let pause = held_pause;
                held_pause = held_pause.saturating_mul(2).min(poll);
                pause
            } else {
                if greedy {
                    return Ok(delivered);
                }
                poll
            };
            let since_balance = balanced.map_or(Duration::ZERO, |at| at.elapsed());
            let wait = wait.min(renew_every.saturating_sub(since_balance));
            tokio::select! {
                () = shutdown.as_mut() => return Ok(delivered),
                () = backend.wait_for_change(since, wait) => {}
            }
        }
    }

    /// One batch (or a move past what did not match) for each partition held.
    async fn pass<H: Handler>(
        &self,
        handler: &mut H,
        held: &mut BTreeMap<u32, Held>,
    ) -> Result<Pass> {
        let mut pass = Pass::default();
        for (&partition, at) in held.iter_mut() {
            let slot = Slot {
                partition,
                token: at.token,
            };
            while let Some(parked) = at.replays.pop() {
                match self.replay(handler, slot, at, parked).await {
                    Ok(delivered) => pass.delivered += delivered,
                    Err(Error::LeaseLost { .. }) => {
                        pass.lost.push(partition);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if pass.lost.contains(&partition) {
                continue;
            }
            let filter = self.filter.clone().in_partition(partition, self.partitions);
            let mut page = self
                .store
                .read_feed_matching(at.cursor, self.batch_size, &filter)
                .await?;
            pass.held_back |= page.held_back.is_some();
            // The events of parked aggregates wait behind the parked one.
            page.events.retain(|e| !at.parked.contains(&e.aggregate_id));
            let outcome = if page.is_empty() {
                if page.scanned <= at.cursor {
                    continue;
                }
                // Nothing to deliver: move past what was looked at, so it is not read again.
                self.checkpoint_only(slot, at.cursor, page.scanned).await
            } else {
                let span = tracing::info_span!(
                    "annals.subscription.batch",
                    subscription = %self.name,
                    partition,
                    events = page.len(),
                    from = ?page.first().map(|e| e.cursor),
                    to = ?page.scanned,
                );
                self.deliver(handler, &page.events, slot, at, page.scanned)
                    .instrument(span)
                    .await
            };
            match outcome {
                Ok(()) => {
                    pass.delivered += page.len() as u64;
                    at.cursor = page.scanned;
                }
                Err(Error::LeaseLost { .. }) => pass.lost.push(partition),
                Err(e) => return Err(e),
            }
        }
        Ok(pass)
    }

    /// Renews the partitions held, gives back those above this worker's fair share, and claims
    /// free ones up to it. The share is the partitions divided by the live workers (the ones
    /// whose heartbeat has not expired), rounded up; a greedy worker (catch-up) takes every
    /// free partition and counts no heartbeat. True when the subscription is paused.
    async fn rebalance(&self, held: &mut BTreeMap<u32, Held>, greedy: bool) -> Result<bool> {
        let backend = &self.store.inner.backend;
        let share = if greedy {
            self.partitions
        } else {
            let live = backend.subscription_heartbeat(&self.claim(0)).await?.max(1);
            self.partitions.div_ceil(live)
        };
        let share = usize::try_from(share).unwrap_or(usize::MAX);
        let mut paused = false;
        let partitions: Vec<u32> = held.keys().copied().collect();
        for partition in partitions {
            match backend.subscription_claim(&self.claim(partition)).await? {
                Some(row) => {
                    if row.state == "failed" {
                        return Err(failed(&row));
                    }
                    paused |= row.state == "paused";
                    let entry = held
                        .entry(partition)
                        .or_insert_with(|| Held::new(row.token, row.cursor));
                    if entry.token != row.token {
                        // Lost and claimed again: the stored cursor is the one to go on from.
                        *entry = Held::new(row.token, row.cursor);
                    }
                }
                None => {
                    held.remove(&partition);
                }
            }
        }
        while held.len() > share {
            let Some((partition, at)) = held.pop_last() else {
                break;
            };
            self.release(partition, at.token).await;
        }
        if held.len() < share {
            let now = SystemTime::now();
            for row in backend.subscription_rows(Some(&self.name)).await? {
                if held.len() >= share {
                    break;
                }
                let free = row.owner.is_none() || row.lease_expires_at.is_none_or(|at| at <= now);
                if held.contains_key(&row.partition) || !free {
                    continue;
                }
                let Some(row) = backend
                    .subscription_claim(&self.claim(row.partition))
                    .await?
                else {
                    continue;
                };
                if row.state == "failed" {
                    self.release(row.partition, row.token).await;
                    return Err(failed(&row));
                }
                paused |= row.state == "paused";
                held.insert(row.partition, Held::new(row.token, row.cursor));
            }
        }
        // What is parked in the partitions held, and what an operator asked to replay.
        for at in held.values_mut() {
            at.parked.clear();
            at.replays.clear();
        }
        for parked in backend.parked(&self.name, None).await? {
            if let Some(at) = held.get_mut(&parked.partition) {
                at.parked.insert(parked.aggregate);
                if parked.state != "parked" {
                    at.replays.push(parked);
                }
            }
        }
        Ok(paused)
    }

    /// Sleeps `wait`, or until shutdown (which the loop then sees).
    async fn pause<F: Future<Output = ()>>(&self, shutdown: &mut Shutdown<'_, F>, wait: Duration) {
        tokio::select! {
            () = shutdown.as_mut() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Gives every partition held back and ends this worker's heartbeat, so other workers can
    /// claim them at once.
    async fn leave(&self, held: &BTreeMap<u32, Held>, greedy: bool) {
        for (&partition, at) in held {
            self.release(partition, at.token).await;
        }
        if greedy {
            return;
        }
        let write = Write::Leave {
            name: self.name.clone(),
            owner: self.owner.clone(),
        };
        if let Err(e) = self.write(write).await {
            tracing::warn!(subscription = %self.name, error = %e, "could not end the heartbeat");
        }
    }

    /// Gives up the lease on `partition`.
    async fn release(&self, partition: u32, token: u64) {
        let write = Write::Release {
            lease: self.lease_of(Slot { partition, token }),
        };
        if let Err(e) = self.write(write).await {
            tracing::warn!(subscription = %self.name, partition, error = %e, "could not release the lease");
        }
    }

    /// Makes `write` in a transaction of its own.
    async fn write(&self, write: Write) -> Result<()> {
        self.commit(vec![write]).await
    }

    /// Makes `writes` in a transaction of their own.
    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let backend = &self.store.inner.backend;
        let state = backend.begin_tx().await?;
        backend.commit_tx(state, writes).await
    }

    /// This worker's claim on `partition`.
    fn claim(&self, partition: u32) -> Claim {
        Claim {
            name: self.name.clone(),
            partition,
            owner: self.owner.clone(),
            lease: self.lease,
        }
    }

    fn lease_of(&self, slot: Slot) -> Lease {
        Lease {
            name: self.name.clone(),
            partition: slot.partition,
            owner: self.owner.clone(),
            token: slot.token,
            duration: self.lease,
        }
    }

    /// Moves the cursor from `from` past events that did not match, to `cursor`.
    async fn checkpoint_only(
        &self,
        slot: Slot,
        from: FeedCursor,
        cursor: FeedCursor,
    ) -> Result<()> {
        self.write(Write::Checkpoint {
            lease: self.lease_of(slot),
            from,
            cursor,
        })
        .await
    }

    /// Delivers one batch, with retries; when it keeps failing, event by event, to checkpoint
    /// the events before the one that fails and then stop there, or park it and go on (see
    /// [`OnFailure`]). `at` is the partition: its cursor before the batch, its parked aggregates.
    async fn deliver<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        slot: Slot,
        at: &mut Held,
        through: FeedCursor,
    ) -> Result<()> {
        let from = at.cursor;
        let checkpoint = |from: FeedCursor, cursor: FeedCursor| {
            vec![Write::Checkpoint {
                lease: self.lease_of(slot),
                from,
                cursor,
            }]
        };
        let message = match self
            .with_retries(handler, events, slot, Some(from), &|| {
                checkpoint(from, through)
            })
            .await?
        {
            None => return Ok(()),
            Some(message) => message,
        };
        let mut from = from;
        let mut failure = Some(message);
        for (index, event) in events.iter().enumerate() {
            let upto = if index + 1 == events.len() {
                through
            } else {
                event.cursor
            };
            if at.parked.contains(&event.aggregate_id) {
                // Held back behind an event of its aggregate parked in this batch.
                continue;
            }
            let one = std::slice::from_ref(event);
            // A batch of one that failed already is not tried again.
            let message = match failure.take().filter(|_| events.len() == 1) {
                Some(message) => Some(message),
                None => {
                    self.with_retries(handler, one, slot, Some(from), &|| checkpoint(from, upto))
                        .await?
                }
            };
            let Some(message) = message else {
                from = upto;
                continue;
            };
            match self.on_failure {
                OnFailure::Stop => return self.fail(slot, event.cursor, message).await,
                OnFailure::Park => {
                    let mut writes = checkpoint(from, upto);
                    writes.push(Write::Park {
                        parked: self.parked(slot, event, message),
                    });
                    self.commit(writes).await?;
                    at.parked.insert(event.aggregate_id);
                    from = upto;
                }
            }
        }
        if from != through {
            // The last events were held back: move past them.
            self.checkpoint_only(slot, from, through).await?;
        }
        Ok(())
    }

    /// The parked row for `event`, failed with `message`.
    fn parked(&self, slot: Slot, event: &RecordedEvent, message: String) -> Parked {
        tracing::warn!(
            subscription = %self.name,
            partition = slot.partition,
            event = %event.event_id,
            aggregate = %event.aggregate_id,
            error = %message,
            "event parked; later events of its aggregate wait behind it"
        );
        Parked {
            name: self.name.clone(),
            aggregate: event.aggregate_id,
            partition: slot.partition,
            version: event.version,
            event_id: event.event_id,
            cursor: cursor_text(event.cursor),
            error: message,
            attempts: self.max_attempts,
            state: "parked".to_owned(),
            parked_at: SystemTime::now(),
        }
    }

    /// Delivers the events of a parked aggregate an operator asked to retry (from the parked
    /// event) or skip (from the one after it), up to the partition's cursor, in batches; each
    /// batch records how far the replay got in its own transaction. Unparks the aggregate when
    /// done; parks it again at the batch that keeps failing. Returns the events delivered.
    async fn replay<H: Handler>(
        &self,
        handler: &mut H,
        slot: Slot,
        at: &mut Held,
        parked: Parked,
    ) -> Result<u64> {
        let after = if parked.state == "skip" {
            parked.version
        } else {
            parked.version.saturating_sub(1)
        };
        let events: Vec<RecordedEvent> = self
            .store
            .inner
            .backend
            .read_stream(parked.aggregate, crate::store::StreamRange::after(after))
            .await?
            .into_iter()
            .filter(|e| e.cursor <= at.cursor && self.filter.admits(e))
            .collect();
        let unpark = |next: Option<u64>| {
            vec![
                Write::Renew {
                    lease: self.lease_of(slot),
                },
                Write::Unpark {
                    name: self.name.clone(),
                    aggregate: parked.aggregate,
                    next,
                },
            ]
        };
        if events.is_empty() {
            self.commit(unpark(None)).await?;
            at.parked.remove(&parked.aggregate);
            return Ok(0);
        }
        let mut delivered = 0;
        let chunks: Vec<&[RecordedEvent]> = events.chunks(self.batch_size).collect();
        for (index, chunk) in chunks.iter().enumerate() {
            let next = (index + 1 < chunks.len())
                .then(|| chunk.last().map(|e| e.version + 1))
                .flatten();
            let failed = self
                .with_retries(handler, chunk, slot, None, &|| unpark(next))
                .await?;
            if let (Some(message), Some(first)) = (failed, chunk.first()) {
                let writes = vec![
                    Write::Renew {
                        lease: self.lease_of(slot),
                    },
                    Write::Park {
                        parked: self.parked(slot, first, message),
                    },
                ];
                self.commit(writes).await?;
                return Ok(delivered);
            }
            delivered += chunk.len() as u64;
        }
        at.parked.remove(&parked.aggregate);
        Ok(delivered)
    }

    /// Tries a batch up to `max_attempts` times, committing `writes()` with it; `Ok(Some(error))`
    /// when every try failed. `from`: the cursor the partition must still be at for a retry
    /// (`None`: only the lease is checked).
    async fn with_retries<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        slot: Slot,
        from: Option<FeedCursor>,
        writes: &(dyn Fn() -> Vec<Write> + Sync),
    ) -> Result<Option<String>> {
        let mut backoff = self.first_backoff;
        for attempt in 1..=self.max_attempts {
            match self.attempt(handler, events, slot, writes()).await {
                Ok(()) => return Ok(None),
                Err(Failure::Stop(e)) => return Err(e),
                Err(Failure::Handler(message)) => {
                    tracing::warn!(
                        subscription = %self.name,
                        partition = slot.partition,
                        attempt,
                        events = events.len(),
                        error = %message,
                        "handler failed"
                    );
                    // A batch another worker has checkpointed meanwhile is not this one's to
                    // retry, nor to fail on: its writes would find that worker's.
                    self.still_at(slot, from).await?;
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

    /// [`Error::LeaseLost`] unless this worker still holds `slot` (with the cursor at `from`).
    async fn still_at(&self, slot: Slot, from: Option<FeedCursor>) -> Result<()> {
        let backend = &self.store.inner.backend;
        match backend
            .subscription_claim(&self.claim(slot.partition))
            .await?
        {
            Some(row) if row.token == slot.token && from.is_none_or(|f| row.cursor == f) => Ok(()),
            _ => Err(Error::LeaseLost {
                name: self.name.clone(),
                partition: slot.partition,
                token: slot.token,
            }),
        }
    }

    /// One try: the handler in a fresh transaction, then `writes` in it.
    async fn attempt<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        slot: Slot,
        writes: Vec<Write>,
    ) -> std::result::Result<(), Failure> {
        let backend = &self.store.inner.backend;
        let mut state = backend.begin_tx().await.map_err(Failure::Stop)?;
        // A handler that panics fails the batch like one that returns an error.
        let mut tx = Transaction { state: &mut state };
        let handling = std::panic::AssertUnwindSafe(handler.handle(events, &mut tx)).catch_unwind();
        // The lease is renewed in the background while the handler works: a long batch keeps
        // its partition. A worker that stops (a paused or dead process) stops renewing too.
        let handled = tokio::select! {
            handled = handling => handled,
            lost = self.keep_lease(slot) => return Err(Failure::Stop(lost)),
        };
        match handled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Failure::Handler(e.to_string())),
            Err(panic) => return Err(Failure::Handler(panic_message(panic.as_ref()))),
        }
        match backend.commit_tx(state, writes).await {
            Ok(()) => Ok(()),
            Err(e @ Error::LeaseLost { .. }) => Err(Failure::Stop(e)),
            // The handler's own SQL runs at commit on SQLite: its failure is the handler's.
            Err(e) => Err(Failure::Handler(e.to_string())),
        }
    }

    /// Renews the lease on `slot` every third of its duration; returns once it is lost.
    async fn keep_lease(&self, slot: Slot) -> Error {
        let every = self.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let renewed = self
                .write(Write::Renew {
                    lease: self.lease_of(slot),
                })
                .await;
            match renewed {
                Ok(()) => {}
                Err(e @ Error::LeaseLost { .. }) => return e,
                // A failed renewal is tried again; the checkpoint decides in the end.
                Err(e) => {
                    tracing::warn!(subscription = %self.name, partition = slot.partition, error = %e, "could not renew the lease");
                }
            }
        }
    }

    /// Stops the subscription at the event at `at`, storing the error.
    async fn fail(&self, slot: Slot, at: FeedCursor, message: String) -> Result<()> {
        self.write(Write::Fail {
            lease: self.lease_of(slot),
            at,
            attempts: self.max_attempts,
            error: message.clone(),
        })
        .await?;
        tracing::error!(
            subscription = %self.name,
            partition = slot.partition,
            cursor = ?at,
            error = %message,
            "subscription stopped"
        );
        Err(Error::SubscriptionFailed {
            name: self.name.clone(),
            cursor: at,
            attempts: self.max_attempts,
            message,
        })
    }
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("the handler panicked: {text}")
}
