//! The conformance suite on SQLite, each test with its own database file.

#![cfg(feature = "sqlite")]

mod conformance;

async fn open() -> (annals::Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    (annals::Store::open(&url).await.expect("open"), dir)
}

conformance_suite!(open());

/// The whole suite again on a store with an aggregate cache.
mod with_cache {
    crate::conformance_suite!(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let options = annals::StoreOptions::new().aggregate_cache(1_000);
        (
            annals::Store::open_with(&url, options).await.expect("open"),
            dir,
        )
    });
}

/// Two handles on one file, the first with an aggregate cache.
mod cache {
    crate::cache_suite!(attributes = [], async {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let options =
            annals::StoreOptions::new().aggregate_cache(crate::conformance::cache::CAPACITY);
        let cached = annals::Store::open_with(&url, options).await.expect("open");
        let other = annals::Store::open(&url).await.expect("open");
        Some((cached, other, dir))
    });
}

#[tokio::test]
async fn commit_too_large_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let options = annals::StoreOptions::new().max_commit_bytes(16 << 10);
    let store = annals::Store::open_with(&url, options).await.unwrap();
    conformance::commit_too_large_is_refused(&store).await;
}
