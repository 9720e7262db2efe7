//! Opening SQLite files annals must not write to: read-only stores, and files whose tables
//! under annals' names belong to another application.

#![cfg(feature = "sqlite")]

mod conformance;

use std::path::Path;

use annals::prelude::*;
use annals::rusqlite::Connection;
use conformance::domain::*;

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Every table of the file with its row count: what "left untouched" compares.
fn tables(path: &Path) -> Vec<(String, i64)> {
    let conn = Connection::open(path).unwrap();
    let names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names
        .into_iter()
        .map(|name| {
            let count = conn
                .query_row(&format!("SELECT COUNT(*) FROM \"{name}\""), [], |r| {
                    r.get(0)
                })
                .unwrap();
            (name, count)
        })
        .collect()
}

#[tokio::test]
async fn a_read_only_store_reads_and_refuses_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.db");
    let writable = Store::open(&url(&path)).await.unwrap();
    let id = conformance::open_account(&writable, "alice", "Alice", 7).await;
    writable.close().await;
    let before = tables(&path);

    for (how, store) in [
        (
            "option",
            Store::open_with(&url(&path), StoreOptions::new().read_only(true)).await,
        ),
        ("URL", Store::open(&format!("{}?mode=ro", url(&path))).await),
    ] {
        let store = store.unwrap_or_else(|e| panic!("{how}: {e}"));
        let alice = store.begin_read_only().load::<Account>(id).await.unwrap();
        assert_eq!((alice.balance, alice.version()), (7, 2), "{how}");
        assert_eq!(
            store.read_feed(FeedCursor::START, 10).await.unwrap().len(),
            2
        );
        let refused = store
            .transact(async |ctx| {
                let mut a = ctx.load::<Account>(id).await?;
                ctx.apply(&mut a, Deposited { amount: 1 })?;
                Ok::<_, Error>(())
            })
            .await;
        assert!(
            matches!(refused, Err(Error::ReadOnly)),
            "{how}: {refused:?}"
        );
        // Appends, prunes and erasures are writes too.
        let appended = store
            .append::<Account>(id, annals::ExpectedVersion::Any, [Deposited { amount: 1 }])
            .await;
        assert!(matches!(appended, Err(Error::ReadOnly)), "{how}");
        assert!(matches!(store.prune_events(id).await, Err(Error::ReadOnly)));
        assert!(matches!(
            store.prune_snapshots(id, 1).await,
            Err(Error::ReadOnly)
        ));
        assert!(matches!(
            store.erase(id, annals::Metadata::new()).await,
            Err(Error::ReadOnly)
        ));
        store.close().await;
        assert_eq!(tables(&path), before, "{how}: nothing written");
    }

    // A file without the schema is not created or migrated read-only.
    let empty = dir.path().join("empty.db");
    Connection::open(&empty).unwrap();
    let opened = Store::open_with(&url(&empty), StoreOptions::new().read_only(true)).await;
    assert!(matches!(opened, Err(Error::Config(_))), "{opened:?}");
    assert!(tables(&empty).is_empty());
}

#[tokio::test]
async fn foreign_tables_under_annals_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE annals_events (id INTEGER PRIMARY KEY, what TEXT);
         INSERT INTO annals_events (what) VALUES ('not an annals event');",
    )
    .unwrap();
    drop(conn);
    let before = tables(&path);

    match Store::open(&url(&path)).await {
        Err(Error::ForeignTable { table }) => assert_eq!(table, "annals_events"),
        other => panic!("expected ForeignTable, got {other:?}"),
    }
    assert_eq!(tables(&path), before, "nothing created or changed");

    // An index under one of annals' table names is refused the same way.
    let indexed = dir.path().join("indexed.db");
    Connection::open(&indexed)
        .unwrap()
        .execute_batch("CREATE TABLE other (x); CREATE INDEX annals_snapshots ON other (x);")
        .unwrap();
    match Store::open(&url(&indexed)).await {
        Err(Error::ForeignTable { table }) => assert_eq!(table, "annals_snapshots"),
        other => panic!("expected ForeignTable, got {other:?}"),
    }
    assert_eq!(tables(&indexed), [("other".to_owned(), 0)]);

    // Under another prefix, the same file holds an annals store beside the foreign table.
    let store = Store::open_with(&url(&path), StoreOptions::new().table_prefix("shop_"))
        .await
        .unwrap();
    conformance::open_account(&store, "bob", "Bob", 1).await;
    let after = tables(&path);
    assert!(after.contains(&("annals_events".to_owned(), 1)));
    assert!(after.contains(&("shop_events".to_owned(), 2)));
}
