//! The conformance suite on PostgreSQL (`DATABASE_URL`), each test in a schema of its own.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/postgres.rs"]
mod support;

conformance_suite!(support::open_fresh());
