//! The conformance suite on the in-memory store.

mod conformance;

conformance_suite!(async { (annals::Store::open("memory:").await.unwrap(), ()) });

#[tokio::test]
async fn commit_too_large_is_refused() {
    let options = annals::StoreOptions::new().max_commit_bytes(16 << 10);
    let store = annals::Store::open_with("memory:", options).await.unwrap();
    conformance::commit_too_large_is_refused(&store).await;
}
