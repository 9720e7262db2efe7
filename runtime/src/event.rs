//! Events: the facts an aggregate is rebuilt from, and the records the store reads back.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::aggregate::AggregateId;
use crate::error::{BoxError, Error, Result};
use crate::metadata::Metadata;

/// A fact that happened to an aggregate. Derive it with `#[derive(Event)]`, beside serde's
/// `Serialize` and `Deserialize`:
///
/// ```
/// use annals::prelude::*;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Event, Serialize, Deserialize)]
/// #[event(name = "door.opened", version = 2)]
/// struct Opened { by: String }
///
/// #[derive(Event, Serialize, Deserialize)]
/// enum Moved {
///     #[event(name = "money.in")]
///     In { amount: i64 },
///     Out { amount: i64 },
/// }
///
/// assert_eq!(<Opened as Event>::NAMES, ["door.opened"]);
/// assert_eq!(<Opened as Event>::VERSION, 2);
/// assert_eq!(<Moved as Event>::NAMES, ["money.in", "Out"]);
/// ```
///
/// A struct is registered under one name (default: the type's name); an enum under one name per
/// variant (default: the variant's name). Generic types and unions are refused.
///
/// # Attribute keys
///
/// | where | key | value | default |
/// | --- | --- | --- | --- |
/// | the struct | `name = "..."` | the registered name, stored with every event: keep it when renaming the type | the type's name |
/// | the struct or enum | `version = N` | the schema version stored with every event (at least 1) | `1` |
/// | the struct or enum | `crate = "..."` | the path generated code names annals by, for a renamed dependency | `::annals` |
/// | an enum variant | `name = "..."` | the variant's registered name | the variant's name |
///
/// `name` on an enum itself is an error: each variant has its own. Names are at most 200 bytes,
/// without control characters, and unique across the program (checked at [`Store::open`]).
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use annals as ledger; // a renamed dependency
///
/// #[derive(ledger::Event, Serialize, Deserialize)]
/// #[event(crate = "ledger", name = "ledger.posted", version = 3)]
/// struct Posted { cents: i64 }
/// # assert_eq!(<Posted as ledger::Event>::NAMES, ["ledger.posted"]);
/// ```
///
/// # Payloads
///
/// The payload is the value's serde JSON. For an enum serde tags externally (the default),
/// only the variant's content is stored, and the registered name says which variant it is: a
/// variant can be renamed in Rust as long as its `name` stays. [`Context::apply`] applies the
/// payload as it will be read back, and refuses an event whose JSON does not decode into it
/// ([`Error::RoundTrip`]).
///
/// [`Store::open`]: crate::Store::open
/// [`Context::apply`]: crate::Context::apply
#[diagnostic::on_unimplemented(
    message = "derive `Event` on `{Self}`: it is used as an annals event but does not implement `annals::Event`",
    label = "`{Self}` is not an event",
    note = "add `#[derive(annals::Event, serde::Serialize, serde::Deserialize)]` to `{Self}`"
)]
pub trait Event: Send + Sync + Sized + 'static {
    /// Every name values of this type are stored under: one for a struct, one per variant for an
    /// enum.
    const NAMES: &'static [&'static str];
    /// The schema version stored with every event of this type.
    const VERSION: u32;

    /// The name this value is stored under.
    fn name(&self) -> &'static str;

    /// Encodes the payload.
    #[doc(hidden)]
    fn encode(&self) -> std::result::Result<Vec<u8>, BoxError>;

    /// Decodes a payload stored under `name` with schema version `version`.
    #[doc(hidden)]
    fn decode(name: &str, version: u32, payload: &[u8]) -> std::result::Result<Self, BoxError>;
}

/// A stored event as the generated dispatch sees it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct StoredPayload<'a> {
    pub name: &'a str,
    pub schema_version: u32,
    pub payload: &'a [u8],
    pub position: u64,
}

impl StoredPayload<'_> {
    /// Decodes into `E`, mapping a failure to [`Error::Decode`] at this event's position.
    pub fn decode<E: Event>(&self) -> Result<E> {
        E::decode(self.name, self.schema_version, self.payload).map_err(|source| Error::Decode {
            what: "event",
            event_type: self.name.to_owned(),
            schema_version: self.schema_version,
            position: self.position,
            source,
        })
    }

    /// The error for a name the aggregate does not list.
    pub fn unknown(&self, aggregate_type: &str) -> Error {
        Error::UnknownEventType {
            event_type: self.name.to_owned(),
            position: self.position,
            aggregate_type: Some(aggregate_type.to_owned()),
        }
    }
}

/// Where a reader of the global feed stands. Pass the cursor of the last event handled to read
/// on from there; [`FeedCursor::START`] reads from the beginning.
///
/// On PostgreSQL the feed is ordered by epoch, then by the writing transaction, so the cursor
/// carries both beside the position; on other stores `epoch` and `tx` are always 0. The epoch
/// changes only when the store moves to another cluster whose transaction ids are behind the
/// stored ones (see the README's PostgreSQL section).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct FeedCursor {
    /// The feed epoch (PostgreSQL), or 0. Cursors saved before epochs existed read as 0.
    #[serde(default)]
    pub epoch: u32,
    /// The writing transaction's id (PostgreSQL), or 0.
    pub tx: u64,
    /// The global position of the last event read.
    pub position: u64,
}

impl FeedCursor {
    /// Before the first event.
    pub const START: FeedCursor = FeedCursor {
        epoch: 0,
        tx: 0,
        position: 0,
    };

    /// The cursor of an event at `position` on a store ordered by position alone (memory,
    /// SQLite).
    // SQLite's cursors come from the shared row decoding; memory builds its own.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) fn at_position(position: u64) -> FeedCursor {
        FeedCursor {
            position,
            ..FeedCursor::START
        }
    }
}

/// An event as read back from the store: where it stands, what it is, and its payload.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    /// The event's place in the global feed.
    pub cursor: FeedCursor,
    /// The aggregate it belongs to.
    pub aggregate_id: AggregateId,
    /// The aggregate type's registered name.
    pub aggregate_type: String,
    /// The aggregate's version after this event (1 for its first event).
    pub version: u64,
    /// The event's registered name.
    pub event_type: String,
    /// The schema version it was written with.
    pub schema_version: u32,
    /// The encoded payload (JSON; for an enum event, the content of its variant).
    pub payload: Vec<u8>,
    /// The event's unique id.
    pub event_id: uuid::Uuid,
    /// When the commit that wrote it was made.
    pub recorded_at: SystemTime,
    /// Correlation, causation, reference and headers.
    pub metadata: Metadata,
}

impl RecordedEvent {
    /// The global position.
    pub fn position(&self) -> u64 {
        self.cursor.position
    }

    /// Decodes the payload as `E`; `Ok(None)` when the event is not one of `E`'s names.
    pub fn decode<E: Event>(&self) -> Result<Option<E>> {
        if !E::NAMES.contains(&self.event_type.as_str()) {
            return Ok(None);
        }
        self.stored().decode().map(Some)
    }

    /// The payload as a JSON value, whatever its Rust type (for an enum event, the variant's
    /// content: `event_type` says which variant).
    pub fn payload_json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode {
            what: "event",
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            position: self.cursor.position,
            source: Box::new(e),
        })
    }

    pub(crate) fn stored(&self) -> StoredPayload<'_> {
        StoredPayload {
            name: &self.event_type,
            schema_version: self.schema_version,
            payload: &self.payload,
            position: self.cursor.position,
        }
    }
}
