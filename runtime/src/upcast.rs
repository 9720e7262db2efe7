//! Upcasting: reading events stored with an older schema version as the current type.
//!
//! An event type declares its current version with `#[event(version = N)]`, and for each older
//! version that needs it, one step to the next version: typed (`1 => OpenedV1`: the old payload
//! decodes as `OpenedV1`, which converts with `From` into the next version's type) or on the
//! JSON value (`1 => json(rename_owner)`: a function that edits the payload in place). A version
//! without a step is read as the next version unchanged, so adding a field with a serde default
//! needs nothing. Stored events keep the version they were written with; every read upcasts.

use serde_json::{Map, Value};

use crate::error::BoxError;

/// An older event's JSON payload on its way to the current version, as a `json(...)` upcast step
/// sees it. A step turns version [`version`](JsonEvent::version) into the next one.
///
/// ```
/// use annals::prelude::*;
/// use annals::JsonEvent;
/// use serde::{Deserialize, Serialize};
///
/// // Version 1 stored `cents`; version 2 calls it `amount` and adds `currency`.
/// #[derive(Event, Serialize, Deserialize)]
/// #[event(name = "doc.upcast.paid", version = 2, upcast(1 => json(paid_v1)))]
/// struct Paid { amount: i64, currency: String }
///
/// fn paid_v1(event: &mut JsonEvent) {
///     event.rename("cents", "amount").set_default("currency", "EUR");
/// }
/// # #[derive(Aggregate, Default)]
/// # #[aggregate(name = "doc.upcast.bill", events(Paid))]
/// # struct Bill { paid: i64, currency: String }
/// # impl Apply<Paid> for Bill {
/// #     fn apply(&mut self, e: &Paid) { self.paid += e.amount; self.currency = e.currency.clone() }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), annals::Error> {
/// # let store = Store::open("memory:").await?;
///
/// // An event as version 1 wrote it.
/// let mut ctx = store.begin();
/// let mut bill = ctx.create::<Bill>()?;
/// ctx.apply_encoded(&mut bill, "doc.upcast.paid", 1, br#"{"cents":250}"#.to_vec())?;
/// let id = bill.id();
/// ctx.commit().await?;
///
/// let bill = store.begin_read_only().load::<Bill>(id).await?;
/// assert_eq!((bill.paid, bill.currency.as_str()), (250, "EUR"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct JsonEvent {
    name: &'static str,
    version: u32,
    payload: Value,
}

impl JsonEvent {
    /// The registered name the event is read as (for an enum event, its variant's name; an
    /// event stored under an alias has its current name here).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The schema version the payload has now: the step turns it into the next one.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The payload (for an enum event, its variant's content).
    pub fn payload(&self) -> &Value {
        &self.payload
    }

    /// The payload, to change as the next version needs.
    pub fn payload_mut(&mut self) -> &mut Value {
        &mut self.payload
    }

    /// Renames the field `from` to `to`, when the payload is an object that has `from`.
    pub fn rename(&mut self, from: &str, to: &str) -> &mut Self {
        if let Some(map) = self.payload.as_object_mut()
            && let Some(value) = map.remove(from)
        {
            map.insert(to.to_owned(), value);
        }
        self
    }

    /// Sets the field `field` to `value` when the payload is an object without it. A payload
    /// that is `null` (a unit struct, a unit variant) becomes an object first.
    pub fn set_default(&mut self, field: &str, value: impl Into<Value>) -> &mut Self {
        if self.payload.is_null() {
            self.payload = Value::Object(Map::new());
        }
        if let Some(map) = self.payload.as_object_mut() {
            map.entry(field).or_insert_with(|| value.into());
        }
        self
    }

    /// Removes the field `field` from an object payload, returning its value.
    pub fn remove(&mut self, field: &str) -> Option<Value> {
        self.payload.as_object_mut()?.remove(field)
    }
}

/// One declared step from an older schema version, as the derive generates it.
#[doc(hidden)]
pub enum Step<T> {
    /// Edits the JSON of version `from` into version `from + 1`.
    Json { from: u32, step: fn(&mut JsonEvent) },
    /// Decodes version `from` as its declared type and converts it, through the later typed
    /// steps, into the current type.
    Typed {
        from: u32,
        read: fn(Value) -> Result<T, BoxError>,
    },
}

impl<T> Step<T> {
    fn from(&self) -> u32 {
        match self {
            Step::Json { from, .. } | Step::Typed { from, .. } => *from,
        }
    }
}

/// Reads an event stored under `name` with schema version `stored`, older than `current`:
/// applies the steps from `stored` on, then decodes the result with `decode_current`. With no
/// step at or after `stored`, the payload is decoded as it is.
#[doc(hidden)]
pub fn upcast<T>(
    name: &'static str,
    stored: u32,
    payload: &[u8],
    current: u32,
    steps: &[Step<T>],
    decode_current: fn(&str, &[u8]) -> Result<T, BoxError>,
) -> Result<T, BoxError> {
    if stored >= current || !steps.iter().any(|s| s.from() >= stored) {
        return decode_current(name, payload);
    }
    let mut event = JsonEvent {
        name,
        version: stored,
        payload: serde_json::from_slice(payload)?,
    };
    while event.version < current {
        match steps.iter().find(|s| s.from() == event.version) {
            Some(Step::Json { step, .. }) => step(&mut event),
            Some(Step::Typed { read, .. }) => return read(event.payload),
            None => {}
        }
        event.version += 1;
    }
    decode_current(name, &serde_json::to_vec(&event.payload)?)
}

/// Decodes the payload of a typed step's version as its declared type.
#[doc(hidden)]
pub fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, BoxError> {
    serde_json::from_value(value).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(_: &str, payload: &[u8]) -> Result<Value, BoxError> {
        Ok(serde_json::from_slice(payload)?)
    }

    fn add_b(e: &mut JsonEvent) {
        e.set_default("b", e.version());
    }

    fn rename_a(e: &mut JsonEvent) {
        e.rename("a", "c");
    }

    #[test]
    fn steps_run_in_order_from_the_stored_version() {
        let steps = [
            Step::Json {
                from: 1,
                step: add_b,
            },
            Step::Json {
                from: 3,
                step: rename_a,
            },
        ];
        let read = |stored| upcast("e", stored, br#"{"a":1}"#, 4, &steps, current).unwrap();
        assert_eq!(read(1), serde_json::json!({"b": 1, "c": 1}));
        assert_eq!(read(2), serde_json::json!({"c": 1}));
        assert_eq!(read(4), serde_json::json!({"a": 1}));
    }

    #[test]
    fn a_typed_step_ends_the_walk() {
        let steps = [Step::Typed {
            from: 2,
            read: |v| Ok(serde_json::json!({ "typed": v })),
        }];
        let read = |stored| upcast("e", stored, b"7", 3, &steps, current).unwrap();
        assert_eq!(read(1), serde_json::json!({"typed": 7}));
        assert_eq!(read(3), serde_json::json!(7));
    }

    #[test]
    fn bad_json_is_an_error_not_a_panic() {
        let steps = [Step::Json {
            from: 1,
            step: add_b,
        }];
        assert!(upcast("e", 1, b"{", 2, &steps, current).is_err());
    }
}
