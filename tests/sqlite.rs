//! The conformance suite on SQLite, each test with its own database file.

#![cfg(feature = "sqlite")]

mod conformance;

async fn open() -> (annals::Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    (annals::Store::open(&url).await.expect("open"), dir)
}

conformance_suite!(open());

#[tokio::test]
async fn commit_too_large_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let options = annals::StoreOptions::new().max_commit_bytes(16 << 10);
    let store = annals::Store::open_with(&url, options).await.unwrap();
    conformance::commit_too_large_is_refused(&store).await;
}
