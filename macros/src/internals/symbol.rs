//! The names of every attribute and key the derives accept.

pub const EVENT: &str = "event";
pub const AGGREGATE: &str = "aggregate";
pub const PROJECTION: &str = "projection";

pub const NAME: &str = "name";
pub const VERSION: &str = "version";
pub const EVENTS: &str = "events";
pub const SNAPSHOT_EVERY: &str = "snapshot_every";
pub const SNAPSHOT_VERSION: &str = "snapshot_version";
pub const CRATE: &str = "crate";
pub const RESET: &str = "reset";
pub const ALIAS: &str = "alias";
pub const UPCAST: &str = "upcast";

/// The keys `#[event(...)]` accepts on a type.
pub const EVENT_KEYS: &[&str] = &[NAME, ALIAS, VERSION, UPCAST, CRATE];
/// The keys `#[event(...)]` accepts on an enum variant.
pub const VARIANT_KEYS: &[&str] = &[NAME, ALIAS];
/// The keys `#[aggregate(...)]` accepts.
pub const AGGREGATE_KEYS: &[&str] = &[NAME, EVENTS, SNAPSHOT_EVERY, SNAPSHOT_VERSION, CRATE];
/// The keys `#[projection(...)]` accepts.
pub const PROJECTION_KEYS: &[&str] = &[NAME, EVENTS, RESET, CRATE];
