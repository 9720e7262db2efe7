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

/// An event that a newer release wrote with a schema version this code does not know: loads,
/// histories and the feed say so with its position, and nothing is guessed.
#[tokio::test]
async fn a_stored_version_newer_than_the_code_is_a_typed_error() {
    use annals::prelude::*;
    use conformance::evolution::{Funded, Wallet};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let id = store
        .transact(async |ctx| {
            let mut wallet = ctx.create::<Wallet>()?;
            for amount in [1, 2] {
                let currency = "EUR".to_owned();
                ctx.apply(&mut wallet, Funded { amount, currency })?;
            }
            Ok::<_, annals::Error>(wallet.id())
        })
        .await
        .unwrap();
    let conn = annals::rusqlite::Connection::open(&path).unwrap();
    let position: i64 = conn
        .query_row(
            "UPDATE annals_events SET schema_version = 9 WHERE sequence = 2 RETURNING position",
            [],
            |row| row.get(0),
        )
        .unwrap();
    let position = u64::try_from(position).unwrap();
    let too_new = |result: Result<_, annals::Error>| match result {
        Err(annals::Error::EventVersionTooNew {
            event_type,
            schema_version,
            known,
            position: at,
        }) => assert_eq!(
            (event_type.as_str(), schema_version, known, at),
            ("evo.deposited", 9, 3, position)
        ),
        other => panic!("expected EventVersionTooNew, got {other:?}"),
    };
    too_new(store.begin_read_only().load::<Wallet>(id).await.map(|_| ()));
    let history = store.history(id).await.unwrap();
    assert!(history[0].decode::<Funded>().unwrap().is_some());
    too_new(history[1].decode::<Funded>().map(|_| ()));
    store.close().await;
}
