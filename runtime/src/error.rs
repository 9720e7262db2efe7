//! The one error type of annals.

use crate::aggregate::AggregateId;

/// A boxed error from a storage backend or a codec, kept as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in annals.
///
/// Variants carry what a caller needs to act: which aggregate, which version, which position in
/// the global feed. The enum is `#[non_exhaustive]`: match the variants you handle and keep a
/// fallback arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another context committed to this aggregate after it was loaded here; nothing of this
    /// context was written. Re-run the work (see [`Store::transact_with_retry`](crate::Store::transact_with_retry)).
    #[error(
        "concurrency conflict on {aggregate_type} {aggregate}: expected version {expected}, found {actual}"
    )]
    Conflict {
        /// The aggregate type's registered name.
        aggregate_type: String,
        /// The aggregate whose version moved.
        aggregate: AggregateId,
        /// The version this context loaded.
        expected: u64,
        /// The version in the store at commit time.
        actual: u64,
    },

    /// [`Context::commit_in`](crate::Context::commit_in) ran inside a caller's transaction whose
    /// snapshot is older than what the context loaded: at `REPEATABLE READ` or `SERIALIZABLE`,
    /// the snapshot is taken at the transaction's first statement, and this aggregate's loaded
    /// version was committed after it, so the transaction cannot commit events that follow it.
    /// Nothing of the context was written; roll the transaction back and run the whole unit of
    /// work again (it counts as a conflict for [`IsConflict`]). Loading before the
    /// transaction's first statement, or `READ COMMITTED`, avoids it.
    #[error(
        "the caller's transaction cannot see version {loaded} of {aggregate_type} {aggregate}: \
         its REPEATABLE READ or SERIALIZABLE snapshot was taken before that version was \
         committed; roll the transaction back and run the whole unit of work again"
    )]
    StaleTransaction {
        /// The aggregate type's registered name.
        aggregate_type: String,
        /// The aggregate the transaction cannot see as loaded.
        aggregate: AggregateId,
        /// The version the context loaded (and the store holds).
        loaded: u64,
    },

    /// The feed has no event at this cursor, so the events after it cannot be found. A cursor
    /// always names an event read before: this one was lost (an asynchronous failover or a
    /// restore that lost the last transactions) or did not come from this store. Nothing was
    /// read; restart the reader from a cursor it read after the loss, or from
    /// [`FeedCursor::START`](crate::FeedCursor::START) to read everything again (handlers must
    /// then tolerate events they saw before).
    #[error(
        "the feed has no event at cursor {cursor:?}: it was lost (a failover or restore) or is \
         from another store; restart the reader from an earlier cursor or from the start"
    )]
    CursorNotFound {
        /// The cursor asked for.
        cursor: crate::FeedCursor,
    },

    /// The connection failed after a commit was sent and before its answer came: the commit
    /// may have been written, or not. It is not a conflict, and the retry helper does not
    /// re-run it (that could apply the work twice). To resolve it, read the aggregates'
    /// versions: each was written when it stands at (or past) the version given here, and the
    /// ids [`Context::apply`](crate::Context::apply) returned find the events in its history.
    #[error(
        "the connection failed after the commit was sent, before its answer came: it may or may \
         not have been written ({source}); read the aggregates' versions to know"
    )]
    CommitOutcomeUnknown {
        /// Every aggregate of the commit, with the version it has if the commit was written.
        aggregates: Vec<(AggregateId, u64)>,
        /// What the driver said.
        #[source]
        source: BoxError,
    },

    /// An event id chosen by the caller ([`Context::apply_with_id`](crate::Context::apply_with_id),
    /// [`Context::set_idempotency_key`](crate::Context::set_idempotency_key)) is stored already
    /// for another event, or staged twice in one context. Nothing of the commit was written.
    #[error("event id {event_id} is already taken by another event; nothing was written")]
    EventIdTaken {
        /// The id.
        event_id: uuid::Uuid,
    },

    /// A commit with ids chosen by the caller was retried, and only some of its events are
    /// stored from the earlier run: the command staged other events this time. Nothing was
    /// written by this commit.
    #[error(
        "this commit's events are only partly stored from an earlier run (event {event_id} is not): \
         the command staged other events this time; nothing was written"
    )]
    PartlyCommitted {
        /// An event of this commit that is not stored.
        event_id: uuid::Uuid,
    },

    /// The database already holds a table (or index, or sequence) under one of annals' names,
    /// but no record of annals' migrations: it belongs to another application, and annals will
    /// not adopt it. Nothing was written. Choose another table prefix (or schema).
    #[error(
        "{table} exists but was not created by annals (there is no annals migrations table); \
         nothing was written: use another table prefix or schema"
    )]
    ForeignTable {
        /// The relation found, with its schema where the database has schemas.
        table: String,
    },

    /// A load needs events that were pruned ([`Store::prune_events`](crate::Store::prune_events))
    /// and no snapshot this code can use covers them: the aggregate type's `snapshot_version`
    /// changed after the prune, say. Nothing was loaded.
    #[error(
        "aggregate {aggregate} cannot be rebuilt: its events from version {from} to {to} were \
         pruned, and no snapshot this code can use covers them"
    )]
    EventsPruned {
        /// The aggregate.
        aggregate: AggregateId,
        /// The first version missing.
        from: u64,
        /// The last version missing.
        to: u64,
    },

    /// No aggregate of that type has this id or key.
    #[error("{aggregate_type} {target} not found")]
    NotFound {
        /// The aggregate type's registered name.
        aggregate_type: String,
        /// The id or natural key that was looked up.
        target: Target,
    },

    /// A natural key is already held by another aggregate of the same type; nothing of this
    /// context was written.
    #[error("{aggregate_type} key {key:?} is already taken")]
    KeyTaken {
        /// The aggregate type's registered name.
        aggregate_type: String,
        /// The natural key.
        key: String,
    },

    /// An aggregate with this id already exists (given to `Context::create_with_id`); nothing
    /// of the context was written.
    #[error("aggregate id {aggregate} is already taken by a {found_type}")]
    IdTaken {
        /// The id.
        aggregate: AggregateId,
        /// The registered name of the aggregate type that holds it.
        found_type: String,
    },

    /// A natural key is empty, longer than [`StoreOptions::max_key_bytes`](crate::StoreOptions::max_key_bytes)
    /// (255 bytes by default), or contains a NUL character.
    #[error("invalid natural key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The id belongs to an aggregate of another type.
    #[error("aggregate {aggregate} is a {found}, not a {expected}")]
    WrongAggregateType {
        /// The aggregate that was loaded.
        aggregate: AggregateId,
        /// The type the caller asked for.
        expected: String,
        /// The type recorded in the store.
        found: String,
    },

    /// A stored event's name is not one the loading code knows.
    #[error(
        "unknown event type {event_type:?} at position {position}{}",
        for_aggregate(aggregate_type)
    )]
    UnknownEventType {
        /// The event's name as stored.
        event_type: String,
        /// The event's position in the global feed.
        position: u64,
        /// The aggregate type that was being rebuilt, when there was one.
        aggregate_type: Option<String>,
    },

    /// A stored payload (event or snapshot) does not decode into its Rust type.
    #[error(
        "cannot decode {what} {event_type:?} (schema version {schema_version}) at position {position}: {source}"
    )]
    Decode {
        /// `"event"` or `"snapshot"`.
        what: &'static str,
        /// The event or aggregate type's name.
        event_type: String,
        /// The stored schema version.
        schema_version: u32,
        /// The event's position in the global feed (for a snapshot: the aggregate version it holds).
        position: u64,
        /// What the decoder said.
        #[source]
        source: BoxError,
    },

    /// A stored event was written with a schema version newer than this program's type knows:
    /// a newer release wrote it. Nothing is guessed; deploy the newer code to read it.
    #[error(
        "event {event_type:?} at position {position} has schema version {schema_version}, newer than the {known} this program knows"
    )]
    EventVersionTooNew {
        /// The stored name.
        event_type: String,
        /// The stored schema version.
        schema_version: u32,
        /// The newest version the event's type declares.
        known: u32,
        /// The event's position in the global feed (0 for an event not yet stored).
        position: u64,
    },

    /// A value could not be encoded before staging; nothing was staged.
    #[error("cannot encode {what} {type_name:?}: {source}")]
    Encode {
        /// `"event"` or `"snapshot"`.
        what: &'static str,
        /// The event or aggregate type's name.
        type_name: String,
        /// What the encoder said.
        #[source]
        source: BoxError,
    },

    /// An event's encoding does not decode back into the event (a float NaN encoded as `null`,
    /// a `skip_serializing` field without a default, an untagged enum or a custom serde impl that
    /// reads something else than it writes): stored, it would make its aggregate unloadable.
    /// Nothing was staged.
    #[error("event {type_name:?} does not decode from its own encoding: {source}")]
    RoundTrip {
        /// The event's registered name.
        type_name: String,
        /// What the decoder said.
        #[source]
        source: BoxError,
    },

    /// An encoded payload is larger than the store accepts; nothing was staged.
    #[error("{what} {type_name:?} is {size} bytes, over the limit of {max} bytes")]
    PayloadTooLarge {
        /// `"event"`, `"snapshot"` or `"metadata"`.
        what: &'static str,
        /// The event or aggregate type's name.
        type_name: String,
        /// The encoded size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },

    /// A commit is larger than the store accepts ([`StoreOptions::max_commit_bytes`], or
    /// PostgreSQL's limit on one message); nothing was written. Split the work into several
    /// contexts.
    ///
    /// [`StoreOptions::max_commit_bytes`]: crate::StoreOptions::max_commit_bytes
    #[error(
        "the commit is {size} bytes encoded, over the limit of {max} bytes: nothing was written; \
         split it into smaller commits"
    )]
    CommitTooLarge {
        /// The commit's encoded size (payloads, metadata, snapshots and keys; on PostgreSQL,
        /// the whole message).
        size: usize,
        /// The limit it went over.
        max: usize,
    },

    /// Two Rust types were registered under one name.
    #[error("type name collision: {kind} name {name:?} is used by both `{first}` and `{second}`")]
    TypeNameCollision {
        /// `"event"`, `"aggregate"` or `"projection"` (a subscription name).
        kind: &'static str,
        /// The registered name.
        name: String,
        /// One Rust type.
        first: String,
        /// The other Rust type.
        second: String,
    },

    /// An aggregate type was used that is not in the registry.
    #[error("aggregate type `{rust_type}` is not registered")]
    UnregisteredAggregate {
        /// The aggregate's Rust type.
        rust_type: String,
    },

    /// `apply` was called on a read-only context.
    #[error("this context is read-only: it cannot stage events")]
    ReadOnly,

    /// A root was used with a context that did not load or create it.
    #[error("aggregate {aggregate} was not loaded or created in this context")]
    ForeignRoot {
        /// The aggregate of the root.
        aggregate: AggregateId,
    },

    /// A root is behind the events this context already staged for its aggregate: another root
    /// of the same aggregate, loaded in this context, has been applied to since.
    #[error(
        "stale root for aggregate {aggregate}: it is at version {root_version}, this context is at {context_version}; load it again"
    )]
    StaleRoot {
        /// The aggregate.
        aggregate: AggregateId,
        /// The root's version.
        root_version: u64,
        /// The version this context has staged up to.
        context_version: u64,
    },

    /// The store holds data that breaks an invariant annals relies on (a gap in an aggregate's
    /// versions, a value out of range). Nothing is changed.
    #[error("corrupt store: {0}")]
    Corrupt(String),

    /// A store URL, option or identifier is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The store's schema was written by a newer annals than this one.
    #[error("the store's schema is version {found}; this annals knows up to version {supported}")]
    SchemaTooNew {
        /// The schema version found in the store.
        found: i64,
        /// The newest schema version this library knows.
        supported: i64,
    },

    /// A durable subscription was opened with settings other than the ones it was created
    /// with: it would read another stream of events from a cursor kept for the first one.
    /// Nothing was changed; open it as stored, or reset it with the new settings
    /// ([`Subscription::reset`](crate::subscription::Subscription::reset)) to rebuild from them.
    #[error(
        "subscription {name:?} was created with {setting} {stored}, not {given}: open it as \
         created, or reset it to start over with a new filter or start (its partitions cannot \
         change: use a new name)"
    )]
    SubscriptionMismatch {
        /// The subscription's name.
        name: String,
        /// Which setting differs: `filter`, `start` or `partitions`.
        setting: &'static str,
        /// The setting as stored.
        stored: String,
        /// The setting as given now.
        given: String,
    },

    /// No durable subscription has this name.
    #[error("no subscription is named {name:?}")]
    SubscriptionNotFound {
        /// The name asked for.
        name: String,
    },

    /// A worker's lease on a subscription partition ended (it expired and another worker
    /// claimed the partition, or the subscription was reset): its checkpoint was refused and the
    /// transaction holding its handler's writes rolled back. The worker claims the partition
    /// again before it reads on.
    #[error(
        "the lease on subscription {name:?} partition {partition} with token {token} is lost; \
         nothing of the batch was written"
    )]
    LeaseLost {
        /// The subscription's name.
        name: String,
        /// The partition.
        partition: u32,
        /// The fencing token the worker held.
        token: u64,
    },

    /// A subscription's handler kept failing on an event, and the subscription's policy
    /// stopped it: its state is failed, with this error and the event's cursor stored, until it
    /// is resumed ([`Subscriptions::resume`](crate::Subscriptions::resume)) or reset.
    #[error(
        "subscription {name:?} stopped at the event at {cursor:?} after {attempts} attempts: \
         {message}"
    )]
    SubscriptionFailed {
        /// The subscription's name.
        name: String,
        /// The cursor of the event the handler failed on.
        cursor: crate::event::FeedCursor,
        /// How many times it was tried.
        attempts: u32,
        /// The handler's last error, as text (as stored).
        message: String,
    },

    /// An inline projection failed (its `project`, or one of its statements): the commit
    /// failed with it, and nothing of it was written.
    #[error("inline projection {name:?} failed, so the commit wrote nothing: {source}")]
    InlineProjection {
        /// The projection's name.
        name: String,
        /// What failed.
        #[source]
        source: BoxError,
    },

    /// No event parked by this subscription has this id.
    #[error("subscription {name:?} has no parked event {event_id}")]
    ParkedEventNotFound {
        /// The subscription's name.
        name: String,
        /// The event id asked for.
        event_id: uuid::Uuid,
    },

    /// The database or the connection failed.
    #[error("backend error: {0}")]
    Backend(#[source] BoxError),
}

fn for_aggregate(aggregate_type: &Option<String>) -> String {
    match aggregate_type {
        Some(t) => format!(" while loading a {t}"),
        None => String::new(),
    }
}

/// What a lookup was for: an aggregate id or a natural key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An aggregate id.
    Id(AggregateId),
    /// A natural key.
    Key(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Id(id) => write!(f, "{id}"),
            Target::Key(key) => write!(f, "with key {key:?}"),
        }
    }
}

impl Error {
    /// Wraps any backend error.
    pub fn backend(source: impl Into<BoxError>) -> Self {
        Error::Backend(source.into())
    }
}

/// Recognises a concurrency conflict inside an error type, so the retry helper can re-run work
/// whose error type is the user's own.
///
/// For [`Error`], two variants count. [`Error::Conflict`]: a commit reports it when an aggregate
/// moved since this context loaded it, when another context created the natural key of an
/// aggregate this one got from `load_or_create_by_key` (the retry then loads it), and when
/// PostgreSQL aborts a commit with a serialization failure or a deadlock.
/// [`Error::StaleTransaction`]: `commit_in` inside a `REPEATABLE READ` or `SERIALIZABLE`
/// transaction whose snapshot predates what the context loaded. Re-running the work reads
/// fresh state, so it may succeed.
///
/// Not conflicts, because re-running the same work gives the same answer: `KeyTaken`
/// (`create_with_key` on a taken key), `IdTaken`, `StaleRoot` (a bug in the work itself),
/// `NotFound`, `RoundTrip`, `Encode`, `PayloadTooLarge`; nor `Backend`: a lost connection is
/// not retried by the helper, retry it in your own code if that suits you.
///
/// Implement it for your error type by asking the `annals::Error` it wraps:
///
/// ```
/// # use annals::IsConflict;
/// enum BankError { Overdrawn, Store(annals::Error) }
/// impl IsConflict for BankError {
///     fn is_conflict(&self) -> bool {
///         matches!(self, BankError::Store(e) if e.is_conflict())
///     }
/// }
/// ```
pub trait IsConflict {
    /// True when the error is a concurrency conflict that re-running the work may resolve.
    fn is_conflict(&self) -> bool;
}

impl IsConflict for Error {
    fn is_conflict(&self) -> bool {
        matches!(
            self,
            Error::Conflict { .. } | Error::StaleTransaction { .. }
        )
    }
}

/// A shorthand for `Result<T, annals::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
