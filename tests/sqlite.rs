//! The conformance suite on SQLite, each test with its own database file.

#![cfg(feature = "sqlite")]

mod conformance;

async fn open() -> (annals::Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    (annals::Store::open(&url).await.expect("open"), dir)
}

conformance_suite!(open());
