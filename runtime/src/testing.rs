//! Test helpers: given past events, when a command runs, then these events (or this error), for
//! an aggregate; and given events, then this state, for a projection. No store is needed.
//!
//! ```
//! use annals::prelude::*;
//! use annals::testing::given;
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Event, Serialize, Deserialize)]
//! # #[event(name = "doc.testing.opened")]
//! # struct Opened { owner: String }
//! # #[derive(Event, Serialize, Deserialize)]
//! # #[event(name = "doc.testing.deposited")]
//! # struct Deposited { amount: i64 }
//! # #[derive(Event, Serialize, Deserialize)]
//! # #[event(name = "doc.testing.withdrawn")]
//! # struct Withdrawn { amount: i64 }
//! # #[derive(Aggregate, Default)]
//! # #[aggregate(name = "doc.testing.account", events(Opened, Deposited, Withdrawn))]
//! # struct Account { balance: i64 }
//! # impl Apply<Opened> for Account { fn apply(&mut self, _: &Opened) {} }
//! # impl Apply<Deposited> for Account { fn apply(&mut self, e: &Deposited) { self.balance += e.amount } }
//! # impl Apply<Withdrawn> for Account { fn apply(&mut self, e: &Withdrawn) { self.balance -= e.amount } }
//! #[derive(Debug, PartialEq)]
//! struct Insufficient;
//!
//! impl Account {
//!     fn withdraw(&self, amount: i64) -> Result<Withdrawn, Insufficient> {
//!         if amount > self.balance { return Err(Insufficient) }
//!         Ok(Withdrawn { amount })
//!     }
//! }
//!
//! given::<Account>()
//!     .event(Opened { owner: "Ann".into() })
//!     .event(Deposited { amount: 10 })
//!     .when(|account| account.withdraw(3))
//!     .then(Withdrawn { amount: 3 })
//!     .state(|account| assert_eq!(account.balance, 7));
//!
//! given::<Account>()
//!     .event(Deposited { amount: 1 })
//!     .when(|account| account.withdraw(3))
//!     .then_error(Insufficient);
//! ```
//!
//! Events are compared as stored: by registered name and JSON payload, so they need neither
//! `PartialEq` nor `Debug`, and a mismatch shows both lists as JSON. Given events, and the
//! events a command returns, are applied as a load applies them: encoded, decoded, then
//! applied. A helper that finds what was not expected panics with a message saying what, as
//! `assert!` does: these are for tests.

use std::fmt;
use std::time::SystemTime;

use crate::aggregate::{Aggregate, AggregateId, Handles};
use crate::error::BoxError;
use crate::event::{Event, FeedCursor, RecordedEvent, StoredPayload};
use crate::metadata::Metadata;
use crate::subscription::Handler;
use crate::subscription::tx::{Transaction, TxState};

/// An event in its stored form, as the helpers compare it.
#[derive(Clone, PartialEq)]
pub struct Encoded {
    /// The registered name (for an enum event, its variant's).
    pub name: &'static str,
    /// The schema version.
    pub schema_version: u32,
    /// The JSON payload.
    pub payload: serde_json::Value,
    bytes: Vec<u8>,
}

impl Encoded {
    /// Encodes `event`; panics when it does not encode.
    pub fn of<E: Event>(event: &E) -> Encoded {
        let name = event.name();
        let bytes = event
            .encode()
            .unwrap_or_else(|e| panic!("event {name:?} does not encode: {e}"));
        let payload = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("event {name:?} does not encode as JSON: {e}"));
        Encoded {
            name,
            schema_version: E::VERSION,
            payload,
            bytes,
        }
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.payload)
    }
}

/// The events a command returns for aggregate `A`: one event, `()` for none, a `Vec` or an
/// `Option` of one event type, or a tuple of up to four events of different types.
pub trait IntoEvents<A> {
    /// The events, encoded, in order.
    fn into_events(self) -> Vec<Encoded>;
}

impl<A> IntoEvents<A> for () {
    fn into_events(self) -> Vec<Encoded> {
        Vec::new()
    }
}

impl<A: Handles<E>, E: Event> IntoEvents<A> for E {
    fn into_events(self) -> Vec<Encoded> {
        vec![Encoded::of(&self)]
    }
}

impl<A: Handles<E>, E: Event> IntoEvents<A> for Vec<E> {
    fn into_events(self) -> Vec<Encoded> {
        self.iter().map(Encoded::of).collect()
    }
}

impl<A: Handles<E>, E: Event> IntoEvents<A> for Option<E> {
    fn into_events(self) -> Vec<Encoded> {
        self.iter().map(Encoded::of).collect()
    }
}

macro_rules! tuple_into_events {
    ($($e:ident),+) => {
        impl<A, $($e),+> IntoEvents<A> for ($($e,)+)
        where
            $(A: Handles<$e>, $e: Event,)+
        {
            #[allow(non_snake_case)]
            fn into_events(self) -> Vec<Encoded> {
                let ($($e,)+) = self;
                vec![$(Encoded::of(&$e)),+]
            }
        }
    };
}

tuple_into_events!(E1, E2);
tuple_into_events!(E1, E2, E3);
tuple_into_events!(E1, E2, E3, E4);

/// Starts a test of aggregate `A`: a fresh state, to which [`Given::event`] adds past events.
pub fn given<A: Aggregate>() -> Given<A> {
    Given {
        state: A::default(),
        version: 0,
    }
}

/// An aggregate's state built from past events (see [`given`]).
#[derive(Debug)]
pub struct Given<A> {
    state: A,
    version: u64,
}

impl<A: Aggregate> Given<A> {
    /// Applies a past event, as a load would.
    pub fn event<E: Event>(mut self, event: E) -> Self
    where
        A: Handles<E>,
    {
        apply(&mut self.state, &mut self.version, &Encoded::of(&event));
        self
    }

    /// Applies several past events of one type.
    pub fn events<E: Event>(self, events: impl IntoIterator<Item = E>) -> Self
    where
        A: Handles<E>,
    {
        events.into_iter().fold(self, Given::event)
    }

    /// Runs a command on the state: a function that decides from it and returns the events to
    /// record, or an error.
    pub fn when<R, Err>(self, command: impl FnOnce(&A) -> Result<R, Err>) -> When<A, Err>
    where
        R: IntoEvents<A>,
    {
        let outcome = command(&self.state).map(IntoEvents::into_events);
        When {
            state: self.state,
            version: self.version,
            outcome,
        }
    }

    /// The state the given events built.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// What a command decided (see [`Given::when`]).
#[derive(Debug)]
pub struct When<A, Err> {
    state: A,
    version: u64,
    outcome: Result<Vec<Encoded>, Err>,
}

impl<A: Aggregate, Err: fmt::Debug> When<A, Err> {
    /// Checks that the command returned exactly `expected` (one event, `()`, a `Vec` or a
    /// tuple), in order, and applies them: [`Then::state`] checks the state after them.
    #[track_caller]
    pub fn then(self, expected: impl IntoEvents<A>) -> Then<A> {
        let expected = expected.into_events();
        let events = match self.outcome {
            Ok(events) => events,
            Err(e) => panic!("expected events {expected:?}, but the command failed: {e:?}"),
        };
        assert!(
            events == expected,
            "the command returned other events\n  returned: {events:?}\n  expected: {expected:?}"
        );
        let (mut state, mut version) = (self.state, self.version);
        for event in &events {
            apply(&mut state, &mut version, event);
        }
        Then { state, version }
    }

    /// Checks that the command failed with `expected`.
    #[track_caller]
    pub fn then_error(self, expected: Err)
    where
        Err: PartialEq,
    {
        match self.outcome {
            Err(e) => assert!(
                e == expected,
                "the command failed otherwise\n  error:    {e:?}\n  expected: {expected:?}"
            ),
            Ok(events) => {
                panic!("expected error {expected:?}, but the command returned {events:?}")
            }
        }
    }

    /// Checks that the command failed with an error for which `check` returns true (for errors
    /// without `PartialEq`: `|e| matches!(e, MyError::Insufficient { .. })`).
    #[track_caller]
    pub fn then_error_matches(self, check: impl FnOnce(&Err) -> bool) {
        match self.outcome {
            Err(e) => assert!(check(&e), "the command failed otherwise: {e:?}"),
            Ok(events) => panic!("expected an error, but the command returned {events:?}"),
        }
    }

    /// What the command returned, encoded, for checks of your own.
    pub fn outcome(&self) -> Result<&[Encoded], &Err> {
        self.outcome.as_deref()
    }
}

/// The state after the command's events (see [`When::then`]).
#[derive(Debug)]
pub struct Then<A> {
    state: A,
    version: u64,
}

impl<A> Then<A> {
    /// Runs `check` on the state after the command's events.
    pub fn state(self, check: impl FnOnce(&A)) -> Self {
        check(&self.state);
        self
    }

    /// The aggregate's version after the command's events: how many events it has.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The state after the command's events.
    pub fn into_state(self) -> A {
        self.state
    }
}

/// Applies one encoded event through the aggregate's dispatch, as a load does.
#[track_caller]
fn apply<A: Aggregate>(state: &mut A, version: &mut u64, event: &Encoded) {
    let stored = StoredPayload {
        name: event.name,
        schema_version: event.schema_version,
        payload: &event.bytes,
        position: 0,
    };
    if let Err(e) = state.apply_stored(&stored) {
        panic!("event {event:?} does not apply to {}: {e}", A::NAME);
    }
    *version += 1;
}

/// Starts a test of a projection (or any [`Handler`]): [`Project::given`] adds the events it
/// sees, and [`Project::run`] hands them over in one batch, in order.
///
/// ```
/// use annals::prelude::*;
/// use annals::testing::project;
/// use annals::{BoxError, Transaction};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Event, Serialize, Deserialize)]
/// # #[event(name = "doc.project.deposited")]
/// # struct Deposited { amount: i64 }
///
/// #[derive(Projection, Default)]
/// #[projection(name = "doc.testing.totals", events(Deposited))]
/// struct Totals { total: i64, last: Option<AggregateId> }
///
/// impl On<Deposited> for Totals {
///     async fn on(&mut self, e: Deposited, env: &Envelope, _: &mut Transaction<'_>) -> Result<(), BoxError> {
///         self.total += e.amount;
///         self.last = Some(env.aggregate_id);
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let (ann, bob) = (AggregateId::new(), AggregateId::new());
/// let totals = project(Totals::default())
///     .given(ann, Deposited { amount: 5 })
///     .given(bob, Deposited { amount: 2 })
///     .run()
///     .await?;
/// assert_eq!((totals.total, totals.last), (7, Some(bob)));
/// # Ok(()) }
/// ```
///
/// The events get positions 1, 2, … and, per aggregate, versions 1, 2, …; the aggregate type
/// is the registered aggregate that lists the event (empty when none does). The handler's
/// transaction runs no SQL, as on the memory store: test a projection that writes SQL against
/// a store.
pub fn project<H: Handler>(handler: H) -> Project<H> {
    Project {
        handler,
        events: Vec::new(),
    }
}

/// A projection and the events it will see (see [`project`]).
#[derive(Debug)]
pub struct Project<H> {
    handler: H,
    events: Vec<RecordedEvent>,
}

impl<H: Handler> Project<H> {
    /// Adds an event of aggregate `aggregate`.
    pub fn given<E: Event>(self, aggregate: AggregateId, event: E) -> Self {
        self.given_with(aggregate, event, Metadata::default())
    }

    /// Adds an event of aggregate `aggregate` with metadata.
    pub fn given_with<E: Event>(
        mut self,
        aggregate: AggregateId,
        event: E,
        metadata: Metadata,
    ) -> Self {
        let encoded = Encoded::of(&event);
        let version = self
            .events
            .iter()
            .filter(|e| e.aggregate_id == aggregate)
            .count() as u64
            + 1;
        let aggregate_type = crate::registry()
            .aggregates_using(encoded.name)
            .next()
            .map_or_else(String::new, |a| a.name.to_owned());
        self.events.push(RecordedEvent {
            cursor: FeedCursor::at_position(self.events.len() as u64 + 1),
            aggregate_id: aggregate,
            aggregate_type,
            key: None,
            version,
            event_type: encoded.name.to_owned(),
            schema_version: encoded.schema_version,
            payload: encoded.bytes,
            event_id: uuid::Uuid::now_v7(),
            recorded_at: SystemTime::now(),
            metadata,
        });
        self
    }

    /// Hands the events to the handler in one batch and returns it, or the handler's error.
    pub async fn run(mut self) -> Result<H, BoxError> {
        let mut state = TxState::Memory;
        let mut tx = Transaction { state: &mut state };
        self.handler.handle(&self.events, &mut tx).await?;
        Ok(self.handler)
    }
}
