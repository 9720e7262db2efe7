//! What the stores keep of a durable subscription, and the writes they make to it: the shapes
//! every backend reads and writes, so that the runner in [`super`] is written once.

use std::time::{Duration, SystemTime};

use crate::aggregate::AggregateId;
use crate::event::FeedCursor;

/// A subscription as it is created: the first open writes it, later opens compare with it.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub name: String,
    pub filter: String,
    pub start: String,
    pub partitions: u32,
    /// The cursor the subscription starts after.
    pub initial: FeedCursor,
}

/// One partition of a subscription, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    pub name: String,
    pub partition: u32,
    pub partitions: u32,
    pub filter: String,
    pub start: String,
    pub cursor: FeedCursor,
    pub owner: Option<String>,
    pub token: u64,
    pub lease_expires_at: Option<SystemTime>,
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub error_cursor: Option<String>,
}

/// A worker's request for the lease on one partition: granted when the partition has no
/// owner, its lease expired, or the worker holds it already (then it is renewed).
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub name: String,
    pub partition: u32,
    pub owner: String,
    pub lease: Duration,
}

/// The lease a write is made under: it is refused ([`Error::LeaseLost`]) when the partition's
/// owner or token changed.
///
/// [`Error::LeaseLost`]: crate::Error::LeaseLost
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub name: String,
    pub partition: u32,
    pub owner: String,
    pub token: u64,
    /// How long the lease lasts from this write.
    pub duration: Duration,
}

/// A write to a subscription's rows, made in a handler transaction.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// The batch up to `cursor` is handled: move the cursor from `from`, clear errors, renew
    /// the lease. The cursor must still be at `from`: a retry of a checkpoint whose commit did
    /// land (its answer lost) then matches no row, and its writes roll back.
    Checkpoint {
        lease: Lease,
        from: FeedCursor,
        cursor: FeedCursor,
    },
    /// The handler failed on the event at `at` as many times as allowed: stop.
    Fail {
        lease: Lease,
        at: FeedCursor,
        attempts: u32,
        error: String,
    },
    /// The worker stops: the partition is free to claim at once.
    Release { lease: Lease },
    /// Renews the lease without moving the cursor: fences a transaction that writes no
    /// checkpoint (a replay of parked events).
    Renew { lease: Lease },
    /// Parks the event `parked.event_id` (insert, or update a parked row of its aggregate).
    Park { parked: Parked },
    /// A replay of a parked aggregate delivered its events up to `next - 1` (`Some(next)`), or
    /// all of them (`None`: the aggregate is no longer parked).
    Unpark {
        name: String,
        aggregate: AggregateId,
        next: Option<u64>,
    },
    /// An operator asks for the parked event `event_id` to be retried (`retry`) or skipped
    /// (`skip`) by the worker holding its partition.
    MarkParked {
        name: String,
        event_id: uuid::Uuid,
        state: &'static str,
    },
    /// The worker `owner` stops running `name`: its heartbeat goes.
    Leave { name: String, owner: String },
    /// Pause (`paused`) or resume (`active`, errors cleared) every partition of `name`.
    State { name: String, state: &'static str },
    /// Start over: every partition of `name` goes back to `cursor` with these settings, errors
    /// cleared, leases ended (their tokens bumped, so a worker still running cannot checkpoint).
    Reset {
        name: String,
        filter: String,
        start: String,
        cursor: FeedCursor,
    },
}

impl Write {
    /// The lease this write is made under, if it needs one.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            Write::Checkpoint { lease, .. }
            | Write::Fail { lease, .. }
            | Write::Renew { lease }
            | Write::Release { lease } => Some(lease),
            Write::Park { .. }
            | Write::Unpark { .. }
            | Write::MarkParked { .. }
            | Write::Leave { .. }
            | Write::State { .. }
            | Write::Reset { .. } => None,
        }
    }

    /// The subscription written to.
    pub fn name(&self) -> &str {
        match self {
            Write::Checkpoint { lease, .. }
            | Write::Fail { lease, .. }
            | Write::Renew { lease }
            | Write::Release { lease } => &lease.name,
            Write::Park { parked } => &parked.name,
            Write::Unpark { name, .. }
            | Write::MarkParked { name, .. }
            | Write::Leave { name, .. }
            | Write::State { name, .. }
            | Write::Reset { name, .. } => name,
        }
    }

    /// The error for a write that matched no row.
    pub fn missed(&self) -> Option<crate::Error> {
        match self {
            Write::Checkpoint { lease, .. }
            | Write::Fail { lease, .. }
            | Write::Renew { lease } => Some(crate::Error::LeaseLost {
                name: lease.name.clone(),
                partition: lease.partition,
                token: lease.token,
            }),
            // Releasing a lease already lost, or leaving twice, changes nothing; parking
            // upserts; an aggregate unparked twice is unparked.
            Write::Release { .. }
            | Write::Leave { .. }
            | Write::Park { .. }
            | Write::Unpark { .. } => None,
            Write::MarkParked { name, event_id, .. } => Some(crate::Error::ParkedEventNotFound {
                name: name.clone(),
                event_id: *event_id,
            }),
            Write::State { name, .. } | Write::Reset { name, .. } => {
                Some(crate::Error::SubscriptionNotFound { name: name.clone() })
            }
        }
    }
}

/// An event parked by a subscription, with the later events of its aggregate held behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parked {
    pub name: String,
    pub aggregate: AggregateId,
    pub partition: u32,
    /// The aggregate's first version not yet delivered (the parked event's, until a replay).
    pub version: u64,
    pub event_id: uuid::Uuid,
    /// The parked event's cursor, as JSON.
    pub cursor: String,
    pub error: String,
    pub attempts: u32,
    /// `parked`, or what an operator asked for: `retry` or `skip`.
    pub state: String,
    pub parked_at: SystemTime,
}

/// The error cursor as stored: JSON text.
pub(crate) fn cursor_text(cursor: FeedCursor) -> String {
    serde_json::to_string(&cursor).unwrap_or_default()
}
