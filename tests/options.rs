//! Options that no store can honour are refused at open with `Error::Config`, never a panic.

use std::time::Duration;

use annals::{Error, Store, StoreOptions};

async fn refused(url: &str, options: StoreOptions) -> String {
    match Store::open_with(url, options).await {
        Err(Error::Config(message)) => message,
        other => panic!("expected a Config error, got {other:?}"),
    }
}

#[tokio::test]
async fn durations_out_of_range_are_config_errors() {
    let mut urls = vec!["memory:".to_owned()];
    let dir = tempfile::tempdir().expect("temp dir");
    if cfg!(feature = "sqlite") {
        urls.push(format!("sqlite://{}", dir.path().join("o.db").display()));
    }
    for url in &urls {
        let message = refused(url, StoreOptions::new().busy_timeout(Duration::MAX)).await;
        assert!(message.contains("busy timeout"), "{message}");
        let message = refused(url, StoreOptions::new().acquire_timeout(Duration::MAX)).await;
        assert!(message.contains("acquire timeout"), "{message}");
        let message = refused(url, StoreOptions::new().poll_interval(Duration::ZERO)).await;
        assert!(message.contains("poll interval"), "{message}");
        // The longest busy timeout SQLite takes is accepted.
        let longest = Duration::from_millis(i32::MAX as u64);
        let store = Store::open_with(url, StoreOptions::new().busy_timeout(longest))
            .await
            .expect("the longest busy timeout");
        store.close().await;
    }
}
