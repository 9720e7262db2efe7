//! Typed projections: `#[derive(Projection)]` and one `On<E>` impl per event it lists.

use std::future::Future;
use std::time::SystemTime;

use super::{Handler, Subscription, Transaction};
use crate::aggregate::AggregateId;
use crate::error::BoxError;
use crate::event::{Event, FeedCursor, RecordedEvent};
use crate::filter::Filter;
use crate::metadata::Metadata;
use crate::store::Store;

/// Where and when an event was recorded: what a typed projection's [`On`] handler gets beside
/// the decoded event.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Envelope {
    /// The aggregate the event belongs to.
    pub aggregate_id: AggregateId,
    /// The aggregate type's registered name.
    pub aggregate_type: String,
    /// The aggregate's version after this event.
    pub version: u64,
    /// The event's registered name (for an enum event, its variant's).
    pub event_type: String,
    /// The schema version it was written with.
    pub schema_version: u32,
    /// Its place in the global feed.
    pub cursor: FeedCursor,
    /// When the commit that wrote it was made.
    pub recorded_at: SystemTime,
    /// The event's id.
    pub event_id: uuid::Uuid,
    /// Its metadata.
    pub metadata: Metadata,
}

impl From<&RecordedEvent> for Envelope {
    fn from(event: &RecordedEvent) -> Envelope {
        Envelope {
            aggregate_id: event.aggregate_id,
            aggregate_type: event.aggregate_type.clone(),
            version: event.version,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            cursor: event.cursor,
            recorded_at: event.recorded_at,
            event_id: event.event_id,
            metadata: event.metadata.clone(),
        }
    }
}

/// How a typed projection handles one event type it lists in
/// `#[projection(events(...))]`: the decoded event, its envelope, and the transaction its
/// checkpoint commits in (see [`Transaction`]).
#[diagnostic::on_unimplemented(
    message = "`{Self}` lists `{E}` in #[projection(events(...))] but does not implement `On<{E}>`",
    label = "no `impl On<{E}> for {Self}`",
    note = "add `impl annals::subscription::On<{E}> for {Self} {{ async fn on(&mut self, event: {E}, envelope: &Envelope, tx: &mut Transaction<'_>) -> Result<(), BoxError> {{ ... }} }}`"
)]
pub trait On<E: Event>: Send {
    /// Handles `event`. An error fails the batch (see [`Subscription::retries`]).
    fn on(
        &mut self,
        event: E,
        envelope: &Envelope,
        tx: &mut Transaction<'_>,
    ) -> impl Future<Output = std::result::Result<(), BoxError>> + Send;
}

/// A typed projection, derived with `#[derive(Projection)]`: a [`Handler`] that decodes each
/// event it lists and hands it to its [`On`] impl, and the durable subscription it runs on,
/// under its name, filtered to exactly its events (the others never leave the database).
///
/// ```
/// use annals::prelude::*;
/// use annals::subscription::{Envelope, On, Projection};
/// use annals::{BoxError, Transaction};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Event, Serialize, Deserialize)]
/// #[event(name = "doc.projection.deposited")]
/// struct Deposited { cents: i64 }
///
/// #[derive(Projection, Default)]
/// #[projection(name = "doc.totals", events(Deposited))]
/// struct Totals { cents: i64 }
///
/// impl On<Deposited> for Totals {
///     async fn on(&mut self, e: Deposited, _: &Envelope, _: &mut Transaction<'_>) -> Result<(), BoxError> {
///         self.cents += e.cents;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), annals::Error> {
/// # let store = Store::open("memory:").await?;
/// let mut totals = Totals::default();
/// Totals::subscription(&store).catch_up(&mut totals).await?;
/// # Ok(()) }
/// ```
///
/// # Attribute keys
///
/// | key | value | default |
/// | --- | --- | --- |
/// | `events(A, B, ...)` | the event types it handles, each with an `On` impl (required) | |
/// | `name = "..."` | the durable subscription's name | the type's name |
/// | `reset = method` | an `async fn method(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError>` that clears the read model when the subscription is reset | nothing to clear |
/// | `crate = "..."` | the path generated code names annals by | `::annals` |
///
/// The derive adds, per listed event, one name check and one decode in `handle`, and one
/// `.event::<E>()` in the filter; no code per event pair.
///
/// A derived projection is in the [registry](crate::registry()) with the events it lists (an
/// event type that only projections list, in a program that reads what another writes, is
/// registered through them). Its name is its position's: two projection types under one name
/// would share it, so [`Store::open`](crate::Store::open) refuses them with
/// [`Error::TypeNameCollision`](crate::Error::TypeNameCollision).
pub trait Projection: Handler + Sized {
    /// The subscription's name.
    const NAME: &'static str;

    /// The projection's events.
    fn filter() -> Filter;

    /// The durable subscription this projection runs on: its name, its events; configure the
    /// rest (start, batch size, partitions, failure policy) on it.
    fn subscription(store: &Store) -> Subscription {
        store.subscription(Self::NAME).filter(Self::filter())
    }
}

impl Store {
    /// The durable subscription of the projection `P` (see [`Projection::subscription`]).
    pub fn projection<P: Projection>(&self) -> Subscription {
        P::subscription(self)
    }
}
