//! # annals
//!
//! Event sourcing for Rust. Derive [`Event`] on the facts of your domain and [`Aggregate`] on
//! the state they build; a [`Context`] loads aggregates, stages the events your commands
//! produce, and commits all of them atomically, across aggregates, or none of them.
//!
//! ```
//! use annals::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Event, Serialize, Deserialize, Debug)]
//! struct Deposited { amount: i64 }
//!
//! #[derive(Aggregate, Serialize, Deserialize, Default, Debug)]
//! #[aggregate(name = "wallet", events(Deposited))]
//! struct Wallet { balance: i64 }
//!
//! impl Apply<Deposited> for Wallet {
//!     fn apply(&mut self, e: &Deposited) { self.balance += e.amount }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), annals::Error> {
//! let store = Store::open("memory:").await?;
//! store.transact(async |ctx| {
//!     let mut alice = ctx.load_or_create_by_key::<Wallet>("alice").await?;
//!     ctx.apply(&mut alice, Deposited { amount: 30 })?;
//!     Ok::<_, annals::Error>(())
//! }).await?;
//!
//! let alice = store.begin_read_only().load_by_key::<Wallet>("alice").await?;
//! assert_eq!((alice.balance, alice.version()), (30, 1));
//! # Ok(()) }
//! ```
//!
//! ## Invariants
//!
//! - A context writes nothing before [`Context::commit`]; loads read committed state without
//!   locks, and the commit checks each changed aggregate's version ([`Error::Conflict`]).
//! - A commit writes all of its events and snapshots, across aggregates, or none.
//! - The global feed ([`Store::read_feed`]) returns every committed event once, in commit order.
//!
//! ## Stores
//!
//! `memory:` (feature `memory`) for tests; `sqlite://…` (feature `sqlite`, the default);
//! `postgres://…` (feature `postgres`). See [`Store::open`].
//!
//! ## Tracing
//!
//! annals logs through [`tracing`](https://docs.rs/tracing); no `println!`. The spans, at
//! `DEBUG` level:
//!
//! | span | when | fields |
//! | --- | --- | --- |
//! | `annals.load` | every load of one aggregate by a context | `aggregate_type`, `aggregate` (id), `version` (rebuilt), `events` (replayed after the snapshot, or after `cached_version` for an aggregate from the [aggregate cache](StoreOptions::aggregate_cache)) |
//! | `annals.commit` | every commit that writes | `aggregates` (changed), `events`, `in_caller_tx` (true for `commit_in` and `TxContext::commit`) |
//!
//! Events: `DEBUG` "conflict, retrying" with `attempt` from the retry helper; `WARN` when a stored
//! snapshot does not decode (the load rebuilds from events) or a snapshot is over the size limit
//! (not staged); `DEBUG` when a cached aggregate is ahead of the store (it is evicted and loaded
//! in full); `INFO` for each migration applied at open; on PostgreSQL, `WARN` when the
//! `LISTEN` connection is lost (waiters poll until it is back).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod aggregate;
mod cache;
mod clash;
mod codec;
mod context;
mod error;
mod event;
mod feed;
mod filter;
mod keys;
mod live;
mod load;
mod log;
mod metadata;
mod prune;
mod rebuild;
pub mod registry;
mod retry;
mod store;
pub mod subscription;
pub mod testing;
mod transact;
#[cfg(feature = "postgres")]
mod tx_context;
mod upcast;

pub use aggregate::{Aggregate, AggregateId, Apply, Handles, Root};
pub use annals_macros::{Aggregate, Event, Projection};
pub use context::{Committed, Context};
pub use error::{BoxError, Error, IsConflict, Result, Target};
pub use event::{Event, FeedCursor, RecordedEvent};
pub use feed::{FeedPage, HeldBack};
pub use filter::Filter;
pub use log::{Appended, ExpectedVersion, NewEvent, ReadStream};
pub use metadata::Metadata;
pub use prune::Erased;
pub use registry::{Registry, registry};
pub use retry::Retry;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use store::{Dialect, Migration, migrations};
pub use subscription::{SqlValue, Subscription, Subscriptions, Transaction};

/// The README's code, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The rusqlite this annals is built with, for code that commits a context inside its own
/// SQLite transaction (see `Context::commit_in_sqlite`) without pinning a second copy of it.
#[cfg(feature = "sqlite")]
pub use rusqlite;
/// The sqlx this annals is built with, for code that shares a connection or a transaction with
/// the store (see `Context::commit_in`) without pinning a second copy of it.
#[cfg(feature = "postgres")]
pub use sqlx;
pub use store::{Listen, Store, StoreOptions, Synchronous};
#[cfg(feature = "postgres")]
pub use tx_context::TxContext;
pub use upcast::JsonEvent;

/// The names most programs need: `use annals::prelude::*;`.
pub mod prelude {
    pub use crate::subscription::{Envelope, On, Projection};
    pub use crate::{
        Aggregate, AggregateId, Apply, Context, Error, Event, FeedCursor, IsConflict, Metadata,
        Projection, RecordedEvent, Retry, Root, Store, StoreOptions,
    };
}

/// What the derives' generated code names. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::error::{BoxError, Error, Result};
    pub use crate::event::StoredPayload;
    pub use crate::registry::{
        AggregateRegistration, EventRegistration, ListedEvent, ProjectionRegistration,
    };
    pub use core::any::TypeId;
    pub use inventory;

    pub use crate::codec::{decode_enum, decode_json, encode_enum, encode_json, variant_mismatch};
    pub use crate::registry::UpcastRegistration;
    pub use serde_json;

    /// A JSON error as the derives' generated code returns it: one function for every type.
    pub fn json_error(error: serde_json::Error) -> BoxError {
        Box::new(error)
    }

    /// True when `name` is one of the registered event type's names or aliases: one function
    /// for every event type.
    pub fn accepts(registration: &EventRegistration, name: &str) -> bool {
        registration.names.contains(&name) || registration.aliases.contains(&name)
    }
    pub use crate::upcast::{JsonEvent, Step, from_json, upcast};

    pub use crate::aggregate::Handler;

    /// Decodes a stored event as `E` and applies it to the state: the handler of every event an
    /// aggregate lists. Its decoding calls `E::decode`, the one decode path of `E`, shared by
    /// every aggregate listing `E`.
    pub fn apply_stored<A, E>(state: &mut A, stored: &StoredPayload<'_>) -> Result<()>
    where
        A: crate::Handles<E>,
        E: crate::Event,
    {
        // `StoredPayload::decode`'s steps, written out: one function per listed event, not two.
        stored.check_version(E::VERSION)?;
        match E::decode(stored.name, stored.schema_version, stored.payload) {
            Ok(event) => {
                <A as crate::Apply<E>>::apply(state, &event);
                Ok(())
            }
            Err(source) => Err(stored.decode_error(source)),
        }
    }

    /// Finds out at compile time whether an aggregate's state is `Clone`: `(&CloneProbe::<T>::NEW)
    /// .clone_for_cache(value)` resolves to [`CloneByClone`] when `T: Clone` (a method taking
    /// the receiver as it is), else to [`CloneNone`] (one more auto-reference).
    pub struct CloneProbe<T>(core::marker::PhantomData<T>);

    impl<T> CloneProbe<T> {
        /// The probe.
        pub const NEW: Self = CloneProbe(core::marker::PhantomData);
    }

    /// A copy through `Clone`.
    pub trait CloneByClone<T> {
        /// `Some(value.clone())`.
        fn clone_for_cache(&self, value: &T) -> Option<T>;
    }

    impl<T: Clone> CloneByClone<T> for CloneProbe<T> {
        fn clone_for_cache(&self, value: &T) -> Option<T> {
            Some(value.clone())
        }
    }

    /// No copy: the state is not `Clone`.
    pub trait CloneNone<T> {
        /// `None`.
        fn clone_for_cache(&self, value: &T) -> Option<T>;
    }

    impl<T> CloneNone<T> for &CloneProbe<T> {
        fn clone_for_cache(&self, _: &T) -> Option<T> {
            None
        }
    }

    /// The error for a name that no variant of an event enum is registered under.
    pub fn unknown_variant(name: &str, rust_type: &str) -> BoxError {
        format!("no variant of `{rust_type}` is registered as {name:?}").into()
    }

    /// Encodes an aggregate's state as a snapshot. Its error is made by a function shared by
    /// every type: one function per aggregate type, not one per type and closure.
    pub fn encode_snapshot<T: serde::Serialize>(state: &T, name: &str) -> Result<Vec<u8>> {
        match serde_json::to_vec(state) {
            Ok(bytes) => Ok(bytes),
            Err(error) => Err(snapshot_encode_error(name, error)),
        }
    }

    /// Decodes a snapshot (its error made as [`encode_snapshot`]'s is).
    pub fn decode_snapshot<T: serde::de::DeserializeOwned>(
        payload: &[u8],
        version: u64,
        name: &str,
        snapshot_version: u32,
    ) -> Result<T> {
        match serde_json::from_slice(payload) {
            Ok(state) => Ok(state),
            Err(error) => Err(snapshot_decode_error(
                name,
                version,
                snapshot_version,
                error,
            )),
        }
    }

    #[cold]
    fn snapshot_encode_error(name: &str, error: serde_json::Error) -> Error {
        Error::Encode {
            what: "snapshot",
            type_name: name.to_owned(),
            source: Box::new(error),
        }
    }

    #[cold]
    fn snapshot_decode_error(
        name: &str,
        version: u64,
        snapshot_version: u32,
        error: serde_json::Error,
    ) -> Error {
        Error::Decode {
            what: "snapshot",
            event_type: name.to_owned(),
            schema_version: snapshot_version,
            position: version,
            source: Box::new(error),
        }
    }

    /// For aggregates without snapshots: a stored snapshot is never asked for.
    pub fn no_snapshots<T>(name: &str, version: u64) -> Result<T> {
        Err(Error::Decode {
            what: "snapshot",
            event_type: name.to_owned(),
            schema_version: 0,
            position: version,
            source: "this aggregate type takes no snapshots".into(),
        })
    }
}
