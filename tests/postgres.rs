//! The conformance suite on PostgreSQL (`DATABASE_URL`), each test in a schema of its own.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/postgres.rs"]
mod support;

conformance_suite!(support::open_fresh());

#[tokio::test]
async fn commit_too_large_is_refused() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let store = schema
        .open_with(schema.options().max_commit_bytes(16 << 10))
        .await;
    conformance::commit_too_large_is_refused(&store).await;
    store.close().await;
}
