//! The conformance suite on the in-memory store.

mod conformance;

conformance_suite!(async { (annals::Store::open("memory:").await.unwrap(), ()) });

/// The whole suite again on a store with an aggregate cache.
mod with_cache {
    crate::conformance_suite!(async {
        let options = annals::StoreOptions::new().aggregate_cache(1_000);
        (
            annals::Store::open_with("memory:", options).await.unwrap(),
            (),
        )
    });
}

/// One in-memory store has one handle: `other` is a clone of the cached handle.
mod cache {
    crate::cache_suite!(attributes = [], async {
        let options =
            annals::StoreOptions::new().aggregate_cache(crate::conformance::cache::CAPACITY);
        let cached = annals::Store::open_with("memory:", options).await.unwrap();
        Some((cached.clone(), cached, ()))
    });
}

#[tokio::test]
async fn commit_too_large_is_refused() {
    let options = annals::StoreOptions::new().max_commit_bytes(16 << 10);
    let store = annals::Store::open_with("memory:", options).await.unwrap();
    conformance::commit_too_large_is_refused(&store).await;
}
