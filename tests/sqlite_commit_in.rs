//! `Context::commit_in_sqlite`: a context committed inside the caller's own rusqlite
//! transaction commits, or rolls back, together with the caller's own table writes.

#![cfg(feature = "sqlite")]

mod conformance;

use std::path::Path;

use annals::prelude::*;
use annals::rusqlite::{Connection, TransactionBehavior};
use conformance::domain::*;

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn invoices(conn: &Connection) -> Vec<(String, i64)> {
    let mut stmt = conn
        .prepare("SELECT number, total FROM invoices ORDER BY number")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn setup() -> (tempfile::TempDir, Store, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.db");
    let store = Store::open(&url(&path)).await.unwrap();
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE invoices (number TEXT PRIMARY KEY, total INTEGER NOT NULL)")
        .unwrap();
    (dir, store, conn)
}

#[tokio::test]
async fn events_and_the_callers_rows_commit_together() {
    let (_dir, store, mut conn) = setup().await;
    let mut ctx = store.begin();
    let mut account = ctx.create_with_key::<Account>("acme").await.unwrap();
    ctx.apply(
        &mut account,
        Opened {
            owner: "Acme".into(),
        },
    )
    .unwrap();
    ctx.apply(&mut account, Deposited { amount: 120 }).unwrap();
    let id = account.id();

    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.execute("INSERT INTO invoices VALUES ('INV-7', 120)", [])
        .unwrap();
    ctx.commit_in_sqlite(&tx).unwrap();
    // Staged in the caller's transaction: the store does not see it yet.
    assert!(
        store
            .begin_read_only()
            .find_by_key::<Account>("acme")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .read_feed(FeedCursor::START, 10)
            .await
            .unwrap()
            .is_empty()
    );
    tx.commit().unwrap();

    let acme = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((acme.balance, acme.version()), (120, 2));
    assert_eq!(invoices(&conn), [("INV-7".to_owned(), 120)]);
    assert_eq!(
        store.read_feed(FeedCursor::START, 10).await.unwrap().len(),
        2
    );

    // The store's own commits go on after the caller's.
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount: 1 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(conformance::versions(&store, id).await, [1, 2, 3]);
}

#[tokio::test]
async fn a_rolled_back_caller_transaction_takes_the_events_with_it() {
    let (_dir, store, mut conn) = setup().await;
    let mut ctx = store.begin();
    let mut account = ctx.create_with_key::<Account>("ghost").await.unwrap();
    ctx.apply(&mut account, Opened { owner: "G".into() })
        .unwrap();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.execute("INSERT INTO invoices VALUES ('INV-8', 5)", [])
        .unwrap();
    ctx.commit_in_sqlite(&tx).unwrap();
    tx.rollback().unwrap();

    assert!(invoices(&conn).is_empty());
    assert!(
        store
            .read_feed(FeedCursor::START, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .begin_read_only()
            .find_by_key::<Account>("ghost")
            .await
            .unwrap()
            .is_none()
    );
    // The key is free again.
    conformance::open_account(&store, "ghost", "G", 1).await;
}

#[tokio::test]
async fn a_conflict_inside_the_callers_transaction_is_typed() {
    let (_dir, store, mut conn) = setup().await;
    let id = conformance::open_account(&store, "alice", "Alice", 10).await;
    let mut stale = store.begin();
    let mut alice = stale.load::<Account>(id).await.unwrap();
    stale.apply(&mut alice, Deposited { amount: 1 }).unwrap();
    // Another context commits first.
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount: 100 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();

    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.execute("INSERT INTO invoices VALUES ('INV-9', 1)", [])
        .unwrap();
    match stale.commit_in_sqlite(&tx) {
        Err(Error::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (2, 3)),
        other => panic!("expected Conflict, got {other:?}"),
    }
    drop(tx); // rolls back
    assert!(invoices(&conn).is_empty());
    let alice = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((alice.balance, alice.version()), (110, 3));

    // A key taken after the context checked it is typed as well.
    let mut ctx = store.begin();
    let mut carol = ctx.create_with_key::<Account>("carol").await.unwrap();
    ctx.apply(&mut carol, Opened { owner: "C".into() }).unwrap();
    conformance::open_account(&store, "carol", "Other Carol", 0).await;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let taken = ctx.commit_in_sqlite(&tx);
    assert!(
        matches!(&taken, Err(Error::KeyTaken { key, .. }) if key == "carol"),
        "{taken:?}"
    );
}

#[tokio::test]
async fn only_on_a_sqlite_store() {
    let store = Store::open("memory:").await.unwrap();
    let mut ctx = store.begin();
    let mut a = ctx.create::<Account>().unwrap();
    ctx.apply(&mut a, Opened { owner: "M".into() }).unwrap();
    let mut conn = Connection::open_in_memory().unwrap();
    let tx = conn.transaction().unwrap();
    assert!(matches!(ctx.commit_in_sqlite(&tx), Err(Error::Config(_))));
}

#[tokio::test]
async fn a_unit_run_again_with_its_key_is_already_committed() {
    let (_dir, store, mut conn) = setup().await;
    let id = conformance::open_account(&store, "ida", "Ida", 0).await;
    let key = uuid::Uuid::now_v7();
    for run in 0..2 {
        let mut ctx = store.begin();
        ctx.set_idempotency_key(key);
        let mut account = ctx.load::<Account>(id).await.unwrap();
        ctx.apply(&mut account, Deposited { amount: 10 }).unwrap();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        tx.execute("INSERT OR IGNORE INTO invoices VALUES ('INV-1', 10)", [])
            .unwrap();
        let committed = ctx.commit_in_sqlite(&tx).unwrap();
        assert_eq!(committed.already_committed(), run == 1);
        if committed.already_committed() {
            tx.rollback().unwrap();
        } else {
            tx.commit().unwrap();
        }
    }
    let account = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((account.balance, account.version()), (10, 2));
    assert_eq!(invoices(&conn), [("INV-1".to_owned(), 10)]);
}
