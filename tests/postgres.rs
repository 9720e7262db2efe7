//! The conformance suite on PostgreSQL (`DATABASE_URL`), each test in a schema of its own.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/postgres.rs"]
mod support;

conformance_suite!(
    attributes = [#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]],
    support::open_fresh()
);
