//! The domain the conformance suite runs on: bank accounts, counters and a meter whose snapshot
//! shape changes.

use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "account.opened")]
pub struct Opened {
    pub owner: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "account.deposited", version = 2)]
pub struct Deposited {
    pub amount: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "account.withdrawn")]
pub struct Withdrawn {
    pub amount: i64,
}

// `Clone`, so that stores opened with an aggregate cache keep accounts in it.
#[derive(Aggregate, Serialize, Deserialize, Default, Debug, Clone)]
#[aggregate(name = "account", events(Opened, Deposited, Withdrawn))]
pub struct Account {
    pub owner: String,
    pub balance: i64,
}

impl Apply<Opened> for Account {
    fn apply(&mut self, e: &Opened) {
        self.owner = e.owner.clone();
    }
}

impl Apply<Deposited> for Account {
    fn apply(&mut self, e: &Deposited) {
        self.balance += e.amount;
    }
}

impl Apply<Withdrawn> for Account {
    fn apply(&mut self, e: &Withdrawn) {
        self.balance -= e.amount;
    }
}

#[derive(Debug, PartialEq)]
pub enum BankError {
    Overdrawn { balance: i64, wanted: i64 },
    Store(String),
    Conflict,
}

impl From<annals::Error> for BankError {
    fn from(e: annals::Error) -> Self {
        if e.is_conflict() {
            BankError::Conflict
        } else {
            BankError::Store(e.to_string())
        }
    }
}

impl IsConflict for BankError {
    fn is_conflict(&self) -> bool {
        matches!(self, BankError::Conflict)
    }
}

impl Account {
    pub fn withdraw(&self, amount: i64) -> Result<Withdrawn, BankError> {
        if amount > self.balance {
            return Err(BankError::Overdrawn {
                balance: self.balance,
                wanted: amount,
            });
        }
        Ok(Withdrawn { amount })
    }
}

/// Events as enum variants: one registered name per variant.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum CounterEvent {
    #[event(name = "counter.incremented")]
    Incremented,
    #[event(name = "counter.added")]
    Added {
        by: u64,
    },
    Reset(u64),
}

#[derive(Aggregate, Serialize, Deserialize, Default, Debug, Clone)]
#[aggregate(name = "counter", events(CounterEvent))]
pub struct Counter {
    pub value: u64,
}

impl Apply<CounterEvent> for Counter {
    fn apply(&mut self, e: &CounterEvent) {
        match e {
            CounterEvent::Incremented => self.value += 1,
            CounterEvent::Added { by } => self.value += by,
            CounterEvent::Reset(to) => self.value = *to,
        }
    }
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "meter.ticked")]
pub struct Ticked;

/// Snapshots every 5 events. `applied_since_load` is not part of the snapshot, so after a load
/// it counts the events replayed on top of the snapshot used.
#[derive(Aggregate, Serialize, Deserialize, Default, Debug)]
#[aggregate(
    name = "meter",
    events(Ticked),
    snapshot_every = 5,
    snapshot_version = 1
)]
pub struct Meter {
    pub ticks: u64,
    #[serde(skip)]
    pub applied_since_load: u64,
}

impl Apply<Ticked> for Meter {
    fn apply(&mut self, _: &Ticked) {
        self.ticks += 1;
        self.applied_since_load += 1;
    }
}

/// The same stored aggregate as [`Meter`], as a later release of the program sees it: the state
/// changed shape, so `snapshot_version` went up and the old snapshots must be ignored.
///
/// One program cannot register two Rust types under one name, so this stand-in for "the next
/// release" implements the trait by hand, without registering, and reuses `Meter`'s dispatch.
#[derive(Default, Debug)]
pub struct MeterNextRelease {
    pub inner: Meter,
}

impl annals::Aggregate for MeterNextRelease {
    const NAME: &'static str = "meter";
    const SNAPSHOT_EVERY: Option<u64> = Some(5);
    const SNAPSHOT_VERSION: u32 = 2;

    fn handler(name: &str) -> Option<annals::__private::Handler<Self>> {
        <Meter as annals::Aggregate>::handler(name)?;
        Some(|state, stored| state.inner.apply_stored(stored))
    }

    fn encode_snapshot(&self) -> Option<annals::Result<Vec<u8>>> {
        Some(annals::__private::encode_snapshot(&self.inner, Self::NAME))
    }

    fn decode_snapshot(payload: &[u8], version: u64) -> annals::Result<Self> {
        annals::__private::decode_snapshot(payload, version, Self::NAME, 2)
            .map(|inner| MeterNextRelease { inner })
    }
}

impl Apply<Ticked> for MeterNextRelease {
    fn apply(&mut self, e: &Ticked) {
        self.inner.apply(e)
    }
}

impl annals::Handles<Ticked> for MeterNextRelease {}

/// A payload with room for arbitrary bytes, for size limits and odd characters.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "blob.written")]
pub struct BlobWritten {
    pub data: String,
}

#[derive(Aggregate, Default, Debug)]
#[aggregate(name = "blob", events(BlobWritten))]
pub struct Blob {
    pub data: String,
}

impl Apply<BlobWritten> for Blob {
    fn apply(&mut self, e: &BlobWritten) {
        self.data = e.data.clone();
    }
}

/// Payloads that do not all survive their own encoding.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "rating.rated")]
pub struct Rated {
    pub rate: f64,
}

/// A field left out of the payload, read back as its default.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "rating.noted")]
pub struct Noted {
    pub text: String,
    #[serde(skip_serializing, default)]
    pub draft: String,
}

/// A field left out of the payload with no default: it never reads back.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "rating.hidden")]
pub struct Hidden {
    #[serde(skip_serializing)]
    pub secret: String,
}

#[derive(Aggregate, Serialize, Deserialize, Default, Debug, PartialEq)]
#[aggregate(name = "rating", events(Rated, Noted, Hidden))]
pub struct Rating {
    pub rates: Vec<f64>,
    pub notes: Vec<(String, String)>,
}

impl Apply<Rated> for Rating {
    fn apply(&mut self, e: &Rated) {
        self.rates.push(e.rate);
    }
}

impl Apply<Noted> for Rating {
    fn apply(&mut self, e: &Noted) {
        self.notes.push((e.text.clone(), e.draft.clone()));
    }
}

impl Apply<Hidden> for Rating {
    fn apply(&mut self, e: &Hidden) {
        self.notes.push((e.secret.clone(), String::new()));
    }
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "grid.marked")]
pub struct Marked {
    pub x: i64,
    pub y: i64,
}

/// A state whose snapshot cannot be JSON: a map with tuple keys.
#[derive(Aggregate, Serialize, Deserialize, Default, Debug)]
#[aggregate(name = "grid", events(Marked), snapshot_every = 2)]
pub struct Grid {
    pub cells: std::collections::HashMap<(i64, i64), u32>,
}

impl Apply<Marked> for Grid {
    fn apply(&mut self, e: &Marked) {
        *self.cells.entry((e.x, e.y)).or_default() += 1;
    }
}

#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(name = "gauge.read")]
pub struct GaugeRead {
    pub value: i64,
}

/// Snapshots every 5 events, and `Clone`, so that a handle with an aggregate cache keeps it.
#[derive(Aggregate, Serialize, Deserialize, Default, Debug, Clone)]
#[aggregate(name = "gauge", events(GaugeRead), snapshot_every = 5)]
pub struct Gauge {
    pub sum: i64,
    pub reads: u64,
}

impl Apply<GaugeRead> for Gauge {
    fn apply(&mut self, e: &GaugeRead) {
        self.sum += e.value;
        self.reads += 1;
    }
}
