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
/// | the struct | `alias = "..."` | a former name: events stored under it load as this type (the key may be given several times) | none |
/// | the struct or enum | `version = N` | the schema version stored with every event (at least 1) | `1` |
/// | the struct or enum | `upcast(N => Type, N => json(function), ...)` | how events stored with an older version N become version N + 1 (see below) | read unchanged |
/// | the struct or enum | `crate = "..."` | the path generated code names annals by, for a renamed dependency | `::annals` |
/// | an enum variant | `name = "..."` | the variant's registered name | the variant's name |
/// | an enum variant | `alias = "..."` | a former name of the variant (several allowed) | none |
///
/// `name` on an enum itself is an error: each variant has its own. Names are at most 200 bytes,
/// without control characters, and unique across the program (checked at [`Store::open`]).
///
/// The type enters the [registry](crate::registry()) through the aggregates that list it in
/// `events(...)` and the projections that handle it: the derive submits nothing of its own,
/// which keeps it cheap to compile. A type that no aggregate or projection of the program lists
/// is not in the registry, and its names are not checked against the others'.
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
/// # Evolution
///
/// Stored events keep the name and schema version they were written with; every read (a load,
/// a history, the feed, a subscription) brings them up to the current version. For each older
/// version `N` there may be one step that turns it into version `N + 1`:
///
/// - **none**: the payload is read as the next version unchanged. Adding a field with
///   `#[serde(default)]`, or an `Option` field, needs nothing but the new `version`.
/// - **typed**, `N => OldType`: the payload decodes as `OldType` (it needs `Deserialize`),
///   which converts with `From` into the type of the next typed step, and the last one into the
///   event type. A missing `From` impl is reported at the step's type.
/// - **JSON**, `N => json(function)` with `fn(&mut JsonEvent)`: the function edits the payload
///   (see [`JsonEvent`](crate::JsonEvent): `rename`, `set_default`, `remove`, or any change to
///   the JSON value). A JSON step cannot follow a typed one. Typed steps are for structs; an enum
///   event's steps are JSON, and [`JsonEvent::name`](crate::JsonEvent::name) says which variant
///   the payload is.
///
/// ```
/// # use annals::prelude::*;
/// # use annals::JsonEvent;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Event, Serialize, Deserialize)]
/// #[event(
///     name = "doc.shop.order_placed",
///     alias = "doc.order.placed",                   // its name before version 2
///     version = 3,
///     upcast(1 => json(rename_total), 2 => PlacedV2),
/// )]
/// struct OrderPlaced { total_cents: i64, currency: String }
///
/// fn rename_total(event: &mut JsonEvent) {          // version 1 called it `total`
///     event.rename("total", "total_cents");
/// }
///
/// #[derive(Deserialize)]
/// struct PlacedV2 { total_cents: i64 }              // version 2 had no currency
///
/// impl From<PlacedV2> for OrderPlaced {
///     fn from(v2: PlacedV2) -> Self {
///         OrderPlaced { total_cents: v2.total_cents, currency: "EUR".into() }
///     }
/// }
/// # #[derive(Aggregate, Default)]
/// # #[aggregate(name = "doc.shop.order", events(OrderPlaced))]
/// # struct Order;
/// # impl Apply<OrderPlaced> for Order { fn apply(&mut self, _: &OrderPlaced) {} }
/// # let versions = &annals::registry().event("doc.order.placed").unwrap().versions;
/// # assert_eq!(versions.len(), 3);
/// ```
///
/// An event stored with a version newer than the type's is refused with
/// [`Error::EventVersionTooNew`], naming its position: a newer release wrote it. The registry
/// lists each event's aliases and how each of its versions is read
/// ([`EventInfo::versions`](crate::registry::EventInfo::versions)). Aliases are names too: an
/// alias that is another type's name or alias makes [`Store::open`] fail with
/// [`Error::TypeNameCollision`].
///
/// # Payloads
///
/// The payload is the value's serde JSON. For an enum serde tags externally (the default),
/// only the variant's content is stored, and the registered name says which variant it is: a
/// variant can be renamed in Rust as long as its `name` stays. [`Context::apply`] applies the
/// payload as it will be read back, and refuses an event whose JSON does not decode into it
/// ([`Error::RoundTrip`]).
///
/// Derive it: implementing it by hand is not supported (its registration, `encode` and `decode`
/// are hidden items that the derive writes or keeps). An event type is serde `Serialize` and
/// `Deserialize` (the trait requires both): without them, the error points at the type.
///
/// [`Store::open`]: crate::Store::open
/// [`Context::apply`]: crate::Context::apply
#[diagnostic::on_unimplemented(
    message = "derive `Event` on `{Self}`: it is used as an annals event but does not implement `annals::Event`",
    label = "`{Self}` is not an event",
    note = "add `#[derive(annals::Event, serde::Serialize, serde::Deserialize)]` to `{Self}`"
)]
pub trait Event: Serialize + serde::de::DeserializeOwned + Send + Sync + Sized + 'static {
    /// Every name values of this type are stored under: one for a struct, one per variant for an
    /// enum.
    const NAMES: &'static [&'static str] = Self::REGISTRATION.names;
    /// Former names that events stored earlier still carry (`#[event(alias = "...")]`): they
    /// load as this type.
    const ALIASES: &'static [&'static str] = Self::REGISTRATION.aliases;
    /// The schema version stored with every event of this type.
    const VERSION: u32 = Self::REGISTRATION.version;
    /// What the registry holds of this type: its names, aliases, versions and upcast steps,
    /// which the constants above read. The derive writes it, as the one constant of its impl
    /// (each constant an impl defines costs every build of the user's crate); each aggregate
    /// and projection that lists the type carries it into the registry.
    #[doc(hidden)]
    const REGISTRATION: crate::registry::EventRegistration;

    /// The name this value is stored under (for a struct, its one name; an enum's derive
    /// names each variant).
    fn name(&self) -> &'static str {
        Self::NAMES.first().copied().unwrap_or_default()
    }

    /// Encodes the payload: the value's serde JSON. The derive keeps this for a struct and
    /// writes its own for an enum (only the variant's content is stored).
    #[doc(hidden)]
    fn encode(&self) -> std::result::Result<Vec<u8>, BoxError> {
        serde_json::to_vec(self).map_err(crate::__private::json_error)
    }

    /// Decodes a payload stored under `name` (one of [`NAMES`](Event::NAMES) or
    /// [`ALIASES`](Event::ALIASES)) with schema version `version`, upcasting an older version.
    /// This default reads the JSON as the current version, whatever `name` and `version`; the
    /// derive writes its own for an enum, and for a struct with upcast steps. A default here,
    /// rather than a body the derive writes, is type-checked once, not once per event type.
    #[doc(hidden)]
    fn decode(name: &str, version: u32, payload: &[u8]) -> std::result::Result<Self, BoxError> {
        let _ = (name, version);
        serde_json::from_slice(payload).map_err(crate::__private::json_error)
    }

    /// True when events stored under `name` are of this type: one of its names or aliases.
    #[doc(hidden)]
    fn accepts(name: &str) -> bool {
        Self::NAMES.contains(&name) || Self::ALIASES.contains(&name)
    }
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
    /// Decodes into `E`, upcasting an older schema version. A failure is [`Error::Decode`] at
    /// this event's position; a version newer than `E`'s is [`Error::EventVersionTooNew`].
    pub fn decode<E: Event>(&self) -> Result<E> {
        self.check_version(E::VERSION)?;
        match E::decode(self.name, self.schema_version, self.payload) {
            Ok(event) => Ok(event),
            Err(source) => Err(self.decode_error(source)),
        }
    }

    /// [`Error::EventVersionTooNew`] when the event was written with a version above `known`.
    pub fn check_version(&self, known: u32) -> Result<()> {
        if self.schema_version > known {
            return Err(Error::EventVersionTooNew {
                event_type: self.name.to_owned(),
                schema_version: self.schema_version,
                known,
                position: self.position,
            });
        }
        Ok(())
    }

    /// The [`Error::Decode`] for this event, with the decoder's `source`.
    pub fn decode_error(&self, source: BoxError) -> Error {
        Error::Decode {
            what: "event",
            event_type: self.name.to_owned(),
            schema_version: self.schema_version,
            position: self.position,
            source,
        }
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
    /// The aggregate's natural key as it is when the event is read (a key changes or is
    /// released after the event was written), or `None` when it has none.
    pub key: Option<String>,
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

    /// Decodes the payload as `E`, upcast to its current schema version; `Ok(None)` when the
    /// event is not stored under one of `E`'s names or aliases.
    pub fn decode<E: Event>(&self) -> Result<Option<E>> {
        if !E::accepts(&self.event_type) {
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
