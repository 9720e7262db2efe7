//! Inline projections: a read model updated in each commit's own transaction, on memory,
//! SQLite and PostgreSQL. The model and the events commit together; a projection that fails
//! (its own error, or a statement the database refuses) fails the commit with nothing written.

mod conformance;
#[cfg(feature = "postgres")]
#[path = "support/postgres.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use annals::prelude::*;
use annals::subscription::{InlineProjection, SqlBatch};
use annals::{BoxError, Error};
use conformance::domain::*;

/// Counts each account's deposits in `{table}`; refuses a deposit of 13, and writes to a table
/// that does not exist for a deposit of 14.
struct Counts {
    table: String,
    calls: Arc<AtomicUsize>,
}

impl InlineProjection for Counts {
    fn name(&self) -> &str {
        "counts"
    }

    fn project(&self, events: &[RecordedEvent], sql: &mut SqlBatch) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let table = &self.table;
        for event in events {
            let Some(deposit) = event.decode::<Deposited>()? else {
                continue;
            };
            if deposit.amount == 13 {
                return Err("13 is refused".into());
            }
            let target = if deposit.amount == 14 {
                format!("{table}_missing")
            } else {
                table.clone()
            };
            sql.execute(
                format!(
                    "INSERT INTO {target} AS c (account, deposits, last_position) VALUES ($1, 1, $2) \
                     ON CONFLICT (account) DO UPDATE SET deposits = c.deposits + 1, \
                     last_position = excluded.last_position"
                ),
                &[event.aggregate_id.into(), (event.position() as i64).into()],
            );
        }
        Ok(())
    }
}

const CREATE: &str =
    "(account TEXT PRIMARY KEY, deposits BIGINT NOT NULL, last_position BIGINT NOT NULL)";

async fn deposit(store: &Store, id: AggregateId, amount: i64) -> Result<(), Error> {
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount })?;
            Ok::<_, Error>(())
        })
        .await
}

/// What every store must do; `model` reads the table back (`None` on the memory store).
async fn inline_projection_commits_with_the_events<F, Fut>(
    store: &Store,
    calls: &AtomicUsize,
    model: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<HashMap<String, (i64, i64)>>>,
{
    let alice = conformance::open_account(store, "alice", "Alice", 1).await;
    let bob = conformance::open_account(store, "bob", "Bob", 2).await;
    deposit(store, alice, 3).await.unwrap();
    assert!(
        calls.load(Ordering::SeqCst) >= 3,
        "projected at every commit"
    );
    let feed = conformance::read_feed_to_end(store, FeedCursor::START, 100).await;
    if let Some(rows) = model().await {
        let last_of = |id: AggregateId| {
            feed.iter()
                .filter(|e| e.aggregate_id == id && e.event_type == "account.deposited")
                .map(|e| e.position() as i64)
                .max()
                .unwrap()
        };
        assert_eq!(rows.get(&alice.to_string()), Some(&(2, last_of(alice))));
        assert_eq!(rows.get(&bob.to_string()), Some(&(1, last_of(bob))));
    }

    // A projection that refuses, or whose statement fails, fails the commit: nothing written.
    let before = model().await;
    for amount in [13, 14] {
        match deposit(store, alice, amount).await {
            Err(Error::InlineProjection { name, .. }) => assert_eq!(name, "counts"),
            // The memory store runs no SQL: the statement for 14 is not run there.
            Ok(()) if amount == 14 && before.is_none() => continue,
            other => panic!("expected the projection to fail the commit, got {other:?}"),
        }
        let after = conformance::read_feed_to_end(store, FeedCursor::START, 100).await;
        assert_eq!(after.len(), feed.len(), "no event of the failed commit");
        assert_eq!(model().await, before, "the model is unchanged");
    }

    // Concurrent commits: the model counts every one.
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let store = store.clone();
            let id = if i % 2 == 0 { alice } else { bob };
            tokio::spawn(async move {
                for _ in 0..10 {
                    store
                        .transact_with_retry(Retry::attempts(100), async |ctx| {
                            let mut a = ctx.load::<Account>(id).await?;
                            ctx.apply(&mut a, Deposited { amount: 1 })?;
                            Ok::<_, Error>(())
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    if let (Some(before), Some(after)) = (before, model().await) {
        let grew = |id: AggregateId| after[&id.to_string()].0 - before[&id.to_string()].0;
        assert_eq!((grew(alice), grew(bob)), (20, 20));
    }
}

fn counts(table: &str) -> (Counts, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    (
        Counts {
            table: table.to_owned(),
            calls: calls.clone(),
        },
        calls,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_projection_on_memory() {
    let (projection, calls) = counts("unused");
    let store = Store::open_with("memory:", StoreOptions::new().inline_projection(projection))
        .await
        .unwrap();
    inline_projection_commits_with_the_events(&store, &calls, || async { None }).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_projection_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inline.db");
    let conn = annals::rusqlite::Connection::open(&path).unwrap();
    conn.execute(&format!("CREATE TABLE counts {CREATE}"), [])
        .unwrap();
    let (projection, calls) = counts("counts");
    let url = format!("sqlite://{}", path.display());
    let store = Store::open_with(&url, StoreOptions::new().inline_projection(projection))
        .await
        .unwrap();
    let read = || {
        let path = path.clone();
        async move {
            let conn = annals::rusqlite::Connection::open(&path).unwrap();
            let mut stmt = conn
                .prepare("SELECT account, deposits, last_position FROM counts")
                .unwrap();
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
                .unwrap()
                .collect::<Result<HashMap<_, _>, _>>()
                .unwrap();
            Some(rows)
        }
    };
    inline_projection_commits_with_the_events(&store, &calls, read).await;
    store.close().await;
}

#[cfg(feature = "postgres")]
#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_projection_on_postgres() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = format!("\"{}\".counts", schema.name);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{}\"; CREATE TABLE {table} {CREATE}",
        schema.name
    )))
    .execute(&raw)
    .await
    .unwrap();
    let (projection, calls) = counts(&table);
    let store = schema
        .open_with(schema.options().inline_projection(projection))
        .await;
    let read = || {
        let (raw, table) = (raw.clone(), table.clone());
        async move {
            let rows: Vec<(String, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT account, deposits, last_position FROM {table}"
            )))
            .fetch_all(&raw)
            .await
            .unwrap();
            Some(rows.into_iter().map(|(a, d, p)| (a, (d, p))).collect())
        }
    };
    inline_projection_commits_with_the_events(&store, &calls, read).await;

    // In a caller's transaction the projection's writes are the caller's: rolled back with it.
    let alice = store
        .begin_read_only()
        .load_by_key::<Account>("alice")
        .await
        .unwrap()
        .id();
    let before = read().await;
    let mut tx = raw.begin().await.unwrap();
    let mut ctx = store.begin_in(&mut tx).unwrap();
    let mut account = ctx.load::<Account>(alice).await.unwrap();
    ctx.apply(&mut account, Deposited { amount: 5 }).unwrap();
    ctx.commit().await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        read().await,
        before,
        "rolled back with the caller's transaction"
    );
    store.close().await;
}
