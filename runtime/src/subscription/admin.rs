//! Operating durable subscriptions: their status and lag, pausing and resuming them.

use std::time::{Duration, SystemTime};

use super::Start;
use super::row::{Row, Write};
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::FeedCursor;
use crate::feed::HeldBack;
use crate::filter::Filter;
use crate::store::Store;

/// Events read at most to measure a subscription's lag.
const LAG_READ: usize = 1000;

/// The durable subscriptions of a store, for operators: [`Store::subscriptions`].
#[derive(Debug, Clone)]
pub struct Subscriptions {
    store: Store,
}

/// Whether a subscription delivers events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionState {
    /// It delivers events (when a worker runs it).
    Active,
    /// Paused on request: workers wait until it is resumed.
    Paused,
    /// Stopped on an event its handler kept failing on; see the status's error.
    Failed,
}

/// How far a subscription is behind the head of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lag {
    /// Events after the cursor that pass the filter, counted up to 1,000.
    pub events: u64,
    /// True when there are more than `events`.
    pub more: bool,
    /// How long ago the oldest of those events was recorded: how far behind in time it is.
    pub behind: Option<Duration>,
    /// Set when the feed is held back by a transaction still open (PostgreSQL): the counts
    /// stop there, and the subscription cannot be caught up until it ends.
    pub held_back: Option<HeldBack>,
}

/// What an operator asked for a parked event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParkedRequest {
    /// Deliver it again.
    Retry,
    /// Skip it: never deliver it.
    Skip,
}

/// An event a subscription parked, as [`Subscriptions::parked`] shows it. The later events of
/// its aggregate wait behind it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// The subscription's name.
    pub subscription: String,
    /// The aggregate whose events wait.
    pub aggregate_id: AggregateId,
    /// The partition it is in.
    pub partition: u32,
    /// The parked event's id.
    pub event_id: uuid::Uuid,
    /// Its cursor in the feed.
    pub cursor: FeedCursor,
    /// The aggregate's first version not yet delivered (the parked event's, until a retry
    /// gets further).
    pub next_version: u64,
    /// The handler's error.
    pub error: String,
    /// How often it was tried.
    pub attempts: u32,
    /// A retry or skip asked for and not yet carried out, if any.
    pub requested: Option<ParkedRequest>,
    /// When it was parked.
    pub parked_at: SystemTime,
}

/// One partition of a durable subscription, as [`Subscriptions::list`] shows it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriptionStatus {
    /// The subscription's name.
    pub name: String,
    /// The partition (0 for a subscription that is not partitioned).
    pub partition: u32,
    /// The filter it was created (or last reset) with.
    pub filter: Filter,
    /// Where it started.
    pub start: Start,
    /// Its state.
    pub state: SubscriptionState,
    /// The cursor of the last event handled (or passed over by the filter).
    pub cursor: FeedCursor,
    /// The worker holding the lease, if its lease has not expired.
    pub owner: Option<String>,
    /// When that lease expires.
    pub lease_expires_at: Option<SystemTime>,
    /// The fencing token of the newest lease: it grows with every change of owner.
    pub lease_token: u64,
    /// The handler's last error, for a failed subscription.
    pub last_error: Option<String>,
    /// The event it failed on.
    pub error_cursor: Option<FeedCursor>,
    /// How often it tried that event.
    pub attempts: u32,
    /// How far behind the head it is.
    pub lag: Lag,
}

impl Store {
    /// The store's durable subscriptions, to list, pause and resume.
    pub fn subscriptions(&self) -> Subscriptions {
        Subscriptions {
            store: self.clone(),
        }
    }
}

impl Subscriptions {
    /// Every partition of every subscription, by name, with its lag.
    pub async fn list(&self) -> Result<Vec<SubscriptionStatus>> {
        let rows = self.store.inner.backend.subscription_rows(None).await?;
        let mut statuses = Vec::with_capacity(rows.len());
        for row in rows {
            statuses.push(self.status_of(row).await?);
        }
        Ok(statuses)
    }

    /// The partitions of the subscription `name`; [`Error::SubscriptionNotFound`] when there is
    /// none.
    pub async fn status(&self, name: &str) -> Result<Vec<SubscriptionStatus>> {
        let rows = self
            .store
            .inner
            .backend
            .subscription_rows(Some(name))
            .await?;
        if rows.is_empty() {
            return Err(Error::SubscriptionNotFound {
                name: name.to_owned(),
            });
        }
        let mut statuses = Vec::with_capacity(rows.len());
        for row in rows {
            statuses.push(self.status_of(row).await?);
        }
        Ok(statuses)
    }

    /// Pauses `name`: its workers finish the batch in flight, then wait until it is resumed.
    pub async fn pause(&self, name: &str) -> Result<()> {
        self.set_state(name, "paused").await
    }

    /// Resumes `name` after a pause or a failure: a failed subscription tries the event it
    /// failed on again (its error is cleared). Workers that returned on the failure must be
    /// started again.
    pub async fn resume(&self, name: &str) -> Result<()> {
        self.set_state(name, "active").await
    }

    /// The events `name` parked ([`OnFailure::Park`](super::OnFailure::Park)), oldest first.
    pub async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>> {
        let parked = self.store.inner.backend.parked(name, None).await?;
        parked
            .into_iter()
            .map(|p| {
                let cursor = serde_json::from_str(&p.cursor).map_err(|e| {
                    Error::Corrupt(format!(
                        "the cursor of an event parked by {name:?} does not decode: {e}"
                    ))
                })?;
                Ok(ParkedEvent {
                    subscription: p.name,
                    aggregate_id: p.aggregate,
                    partition: p.partition,
                    event_id: p.event_id,
                    cursor,
                    next_version: p.version,
                    error: p.error,
                    attempts: p.attempts,
                    requested: match p.state.as_str() {
                        "retry" => Some(ParkedRequest::Retry),
                        "skip" => Some(ParkedRequest::Skip),
                        _ => None,
                    },
                    parked_at: p.parked_at,
                })
            })
            .collect()
    }

    /// Asks the worker holding its partition to deliver the parked event `event_id` again,
    /// then the events of its aggregate held behind it, and to unpark the aggregate.
    /// [`Error::ParkedEventNotFound`] when `name` has no such parked event.
    pub async fn retry_parked(&self, name: &str, event_id: uuid::Uuid) -> Result<()> {
        self.mark(name, event_id, "retry").await
    }

    /// Asks the worker holding its partition to skip the parked event `event_id` (it is never
    /// delivered), then deliver the events of its aggregate held behind it, and unpark the
    /// aggregate.
    pub async fn skip_parked(&self, name: &str, event_id: uuid::Uuid) -> Result<()> {
        self.mark(name, event_id, "skip").await
    }

    async fn mark(&self, name: &str, event_id: uuid::Uuid, state: &'static str) -> Result<()> {
        let backend = &self.store.inner.backend;
        let tx = backend.begin_tx().await?;
        let write = Write::MarkParked {
            name: name.to_owned(),
            event_id,
            state,
        };
        backend.commit_tx(tx, vec![write]).await
    }

    async fn set_state(&self, name: &str, state: &'static str) -> Result<()> {
        let backend = &self.store.inner.backend;
        let tx = backend.begin_tx().await?;
        let write = Write::State {
            name: name.to_owned(),
            state,
        };
        backend.commit_tx(tx, vec![write]).await
    }

    async fn status_of(&self, row: Row) -> Result<SubscriptionStatus> {
        let corrupt = |what: &str, e: serde_json::Error| {
            Error::Corrupt(format!(
                "the {what} of subscription {:?} does not decode: {e}",
                row.name
            ))
        };
        let filter: Filter = serde_json::from_str(&row.filter).map_err(|e| corrupt("filter", e))?;
        let start: Start = serde_json::from_str(&row.start).map_err(|e| corrupt("start", e))?;
        let error_cursor = match &row.error_cursor {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| corrupt("error cursor", e))?),
            None => None,
        };
        let page = self
            .store
            .read_feed_matching(row.cursor, LAG_READ, &filter)
            .await?;
        let lag = Lag {
            events: page.len() as u64,
            more: page.len() == LAG_READ,
            behind: page.first().map(|e| {
                SystemTime::now()
                    .duration_since(e.recorded_at)
                    .unwrap_or_default()
            }),
            held_back: page.held_back.clone(),
        };
        let now = SystemTime::now();
        let live = row.lease_expires_at.is_some_and(|at| at > now);
        Ok(SubscriptionStatus {
            state: match row.state.as_str() {
                "paused" => SubscriptionState::Paused,
                "failed" => SubscriptionState::Failed,
                _ => SubscriptionState::Active,
            },
            name: row.name,
            partition: row.partition,
            filter,
            start,
            cursor: row.cursor,
            owner: if live { row.owner } else { None },
            lease_expires_at: if live { row.lease_expires_at } else { None },
            lease_token: row.token,
            last_error: row.last_error,
            error_cursor,
            attempts: row.attempts,
            lag,
        })
    }
}
