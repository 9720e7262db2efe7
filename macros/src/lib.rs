//! Derive macros for [annals](https://docs.rs/annals): `#[derive(Event)]` and
//! `#[derive(Aggregate)]`. Use them through the `annals` crate, which re-exports both.

#![forbid(unsafe_code)]

mod aggregate;
mod event;
mod internals;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Derives `annals::Event` for a struct (one registered name) or an enum (one name per
/// variant), beside serde's `Serialize` and `Deserialize`.
///
/// Keys of `#[event(...)]`: on the type, `name = "..."` (structs; default: the type's name),
/// `version = N` (schema version, default 1) and `crate = "..."` (the path to annals, default
/// `::annals`); on an enum variant, `name = "..."` (default: the variant's name). The trait
/// `annals::Event` documents each with a compiled example.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
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
    let input = parse_macro_input!(input as DeriveInput);
    aggregate::expand(&input).into()
}
