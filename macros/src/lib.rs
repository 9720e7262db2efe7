//! Derive macros for [annals](https://docs.rs/annals): `#[derive(Event)]`,
//! `#[derive(Aggregate)]` and `#[derive(Projection)]`. Use them through the `annals` crate,
//! which re-exports them.

#![forbid(unsafe_code)]
//!
//! # What each derive adds to a user's crate
//!
//! Users compile this code on every build, so each derive generates little per type and calls
//! shared, non-generic functions of the runtime for the rest:
//!
//! - **`Event`**: one `impl Event` with one constant, the type's registration (its names,
//!   aliases, version and upcast steps' names, its path as a string and its `TypeId`; what it
//!   leaves empty comes from one shared constant), which `NAMES`, `ALIASES` and `VERSION`
//!   read. A struct keeps the trait's provided `name`, `encode` and `decode` (its JSON, through
//!   the `Serialize` and `DeserializeOwned` supertraits), whose bodies are type-checked once in
//!   the runtime, not once per event type; only an enum gets its own three (its variant names,
//!   and only the variant's content stored), each calling one runtime function. Each constant
//!   and function body of an impl costs every build its own type check, MIR and evaluation (a
//!   body also its borrow check), so the derive writes only what differs per type. No `inventory` submission: the aggregates and
//!   projections that list the type carry its registration, as one reference each, in their
//!   own. An `inventory` item costs a static, a constructor function and its `.init_array`
//!   entry, which for every event of a large domain added about 8 % to `cargo check`.
//!   `upcast(...)` adds a `decode` with one branch for older versions and one small function
//!   per declared step; a type without steps gets nothing for them.
//! - **`Aggregate`**: one `impl Aggregate` whose `handler` maps a stored name to the runtime's
//!   generic `apply_stored::<Self, E>` for each listed event (looked up once per event type per
//!   load, then called for each event; its decoding is `E`'s alone, shared by every aggregate
//!   listing `E`), one empty `impl Handles<E>` per listed event (a marker that checks the
//!   `Apply` impl), and one `inventory` submission of constants, with a reference to each
//!   listed event's registration.
//! - **`Projection`**: one `impl Projection`, one `impl Handler` whose `handle` has one name
//!   check and one decode per listed event, and one `inventory` submission like an
//!   aggregate's.
//!
//! Each derive parses only what it reads of the item (its attributes, name and generics, and an
//! enum's variants' attributes and names); fields are skipped unparsed.

mod aggregate;
mod event;
mod internals;
mod projection;

use proc_macro::TokenStream;
use syn::parse_macro_input;

use crate::internals::ast::Input;

/// Derives `annals::Event` for a struct (one registered name) or an enum (one name per
/// variant), beside serde's `Serialize` and `Deserialize`.
///
/// Keys of `#[event(...)]`: on the type, `name = "..."` (structs; default: the type's name),
/// `alias = "..."` (structs; a former name, several allowed), `version = N` (schema version,
/// default 1), `upcast(N => OldType, N => json(function), ...)` (how older versions are read)
/// and `crate = "..."` (the path to annals, default `::annals`); on an enum variant,
/// `name = "..."` (default: the variant's name) and `alias = "..."`. The trait `annals::Event`
/// documents each with a compiled example.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as Input);
    event::expand(&input).into()
}

/// Derives `annals::Aggregate`: the dispatch from stored events to `Apply` impls, the snapshot
/// codec and the registration.
///
/// Keys of `#[aggregate(...)]`: `events(A, B, ...)` (required), `name = "..."` (default: the
/// type's name), `snapshot_every = N`, `snapshot_version = N` (default 1; needs
/// `snapshot_every`) and `crate = "..."` (default `::annals`). The trait `annals::Aggregate`
/// documents each with a compiled example.
#[proc_macro_derive(Aggregate, attributes(aggregate))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as Input);
    aggregate::expand(&input).into()
}

/// Derives `annals::subscription::Projection` and its `Handler`: each event listed in
/// `events(...)` is decoded and handed to the type's `On<E>` impl, and the projection's
/// subscription reads only those events.
///
/// Keys of `#[projection(...)]`: `events(A, B, ...)` (required), `name = "..."` (the
/// subscription's name; default: the type's name), `reset = method` (an async method that
/// clears the read model on a reset) and `crate = "..."` (default `::annals`). The trait
/// `annals::subscription::Projection` documents each with a compiled example.
#[proc_macro_derive(Projection, attributes(projection))]
pub fn derive_projection(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as Input);
    projection::expand(&input).into()
}
