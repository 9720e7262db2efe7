//! The worker loop of a durable subscription: claim a fair share of its partitions, deliver
//! each partition's batches with retries, checkpoint under the lease, give partitions back.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::Fuse;
use tracing::Instrument;

use super::row::{Claim, Lease, Write};
use super::{Handler, Subscription, Transaction, failed};
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::store::HELD_BACK_FIRST_PAUSE;

/// A partition this worker holds: its fencing token and the cursor it has reached.
#[derive(Debug, Clone, Copy)]
struct Held {
    token: u64,
    cursor: FeedCursor,
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
            let filter = self.filter.clone().in_partition(partition, self.partitions);
            let page = self
                .store
                .read_feed_matching(at.cursor, self.batch_size, &filter)
                .await?;
            pass.held_back |= page.held_back.is_some();
            let outcome = if page.is_empty() {
                if page.scanned <= at.cursor {
                    continue;
                }
                // Nothing matched: move past what was looked at, so it is not read again.
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
                self.deliver(handler, &page.events, slot, at.cursor, page.scanned)
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
                    let entry = held.entry(partition).or_insert(Held {
                        token: row.token,
                        cursor: row.cursor,
                    });
                    if entry.token != row.token {
                        // Lost and claimed again: the stored cursor is the one to go on from.
                        *entry = Held {
                            token: row.token,
                            cursor: row.cursor,
                        };
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
                held.insert(
                    row.partition,
                    Held {
                        token: row.token,
                        cursor: row.cursor,
                    },
                );
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
        let backend = &self.store.inner.backend;
        let state = backend.begin_tx().await?;
        backend.commit_tx(state, write).await
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
    /// the events before the one that fails and stop there.
    async fn deliver<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        slot: Slot,
        from: FeedCursor,
        through: FeedCursor,
    ) -> Result<()> {
        let Some(message) = self
            .with_retries(handler, events, slot, from, through)
            .await?
        else {
            return Ok(());
        };
        let Some(first) = events.first() else {
            return Ok(());
        };
        if events.len() == 1 {
            return self.fail(slot, first.cursor, message).await;
        }
        let mut from = from;
        for (index, event) in events.iter().enumerate() {
            let upto = if index + 1 == events.len() {
                through
            } else {
                event.cursor
            };
            let one = std::slice::from_ref(event);
            if let Some(message) = self.with_retries(handler, one, slot, from, upto).await? {
                return self.fail(slot, event.cursor, message).await;
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
        slot: Slot,
        from: FeedCursor,
        through: FeedCursor,
    ) -> Result<Option<String>> {
        let mut backoff = self.first_backoff;
        for attempt in 1..=self.max_attempts {
            match self.attempt(handler, events, slot, from, through).await {
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

    /// [`Error::LeaseLost`] unless this worker still holds `slot` with the cursor at `from`.
    async fn still_at(&self, slot: Slot, from: FeedCursor) -> Result<()> {
        let backend = &self.store.inner.backend;
        match backend
            .subscription_claim(&self.claim(slot.partition))
            .await?
        {
            Some(row) if row.token == slot.token && row.cursor == from => Ok(()),
            _ => Err(Error::LeaseLost {
                name: self.name.clone(),
                partition: slot.partition,
                token: slot.token,
            }),
        }
    }

    /// One try: the handler in a fresh transaction, then the checkpoint from `from` to
    /// `through` in it.
    async fn attempt<H: Handler>(
        &self,
        handler: &mut H,
        events: &[RecordedEvent],
        slot: Slot,
        from: FeedCursor,
        through: FeedCursor,
    ) -> std::result::Result<(), Failure> {
        let backend = &self.store.inner.backend;
        let mut state = backend.begin_tx().await.map_err(Failure::Stop)?;
        handler
            .handle(events, &mut Transaction { state: &mut state })
            .await
            .map_err(|e| Failure::Handler(e.to_string()))?;
        let write = Write::Checkpoint {
            lease: self.lease_of(slot),
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
