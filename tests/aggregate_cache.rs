//! The aggregate cache against what only a SQL store can do: rows changed behind the store's
//! back (a restore from a backup), and commits inside the caller's transaction that the caller
//! rolls back. The cases every store shares are in `conformance/cache.rs`.

#![cfg(any(feature = "sqlite", feature = "postgres"))]

mod conformance;
#[cfg(feature = "postgres")]
#[path = "support/postgres.rs"]
mod support;

use annals::prelude::*;
use conformance::domain::*;

async fn deposit(store: &Store, id: AggregateId, amount: i64) {
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
}

async fn balance(store: &Store, id: AggregateId) -> (i64, u64) {
    let a = store.begin_read_only().load::<Account>(id).await.unwrap();
    (a.balance, a.version())
}

/// An account at version 5 (opened, then deposits of 10, 1, 2 and 3), cached by `cached`.
async fn account_at_version_5(cached: &Store) -> AggregateId {
    let id = conformance::open_account(cached, "alice", "Alice", 10).await;
    for amount in 1..=3 {
        deposit(cached, id, amount).await;
    }
    assert_eq!(balance(cached, id).await, (16, 5));
    assert_eq!(cached.cached_aggregates(), 1);
    id
}

/// After the store went back to version 2 behind `cached`'s back: the cached handle loads
/// version 2, and commits on top of it.
async fn loads_the_restored_version(cached: &Store, id: AggregateId) {
    assert_eq!(balance(cached, id).await, (10, 2));
    deposit(cached, id, 100).await;
    assert_eq!(balance(cached, id).await, (110, 3));
}

/// After event 3 was made undecodable behind the store's back: only full loads read it.
async fn only_full_loads_read_the_broken_event(cached: &Store, other: &Store, id: AggregateId) {
    let full = other.begin_read_only().load::<Account>(id).await;
    assert!(matches!(full, Err(Error::Decode { .. })), "{full:?}");
    assert_eq!(balance(cached, id).await, (16, 5));
    cached.clear_aggregate_cache();
    let full = cached.begin_read_only().load::<Account>(id).await;
    assert!(matches!(full, Err(Error::Decode { .. })), "{full:?}");
}

/// A context of `store` with a deposit of `amount` to `id` staged.
async fn staged_deposit(store: &Store, id: AggregateId, amount: i64) -> Context {
    let mut ctx = store.begin();
    let mut a = ctx.load::<Account>(id).await.unwrap();
    ctx.apply(&mut a, Deposited { amount }).unwrap();
    ctx
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use annals::rusqlite::{Connection, TransactionBehavior};

    async fn open() -> (tempfile::TempDir, Store, Store, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let url = format!("sqlite://{}", path.display());
        let cached = Store::open_with(&url, StoreOptions::new().aggregate_cache(100))
            .await
            .unwrap();
        let other = Store::open(&url).await.unwrap();
        let conn = Connection::open(&path).unwrap();
        (dir, cached, other, conn)
    }

    #[tokio::test]
    async fn a_store_restored_behind_the_cache_is_loaded_in_full() {
        let (_dir, cached, _other, conn) = open().await;
        let id = account_at_version_5(&cached).await;
        // The database goes back to version 2, as a restore from an older backup would.
        let blob = id.as_uuid().as_bytes().to_vec();
        conn.execute(
            "DELETE FROM annals_events WHERE aggregate_id = ?1 AND sequence > 2",
            [&blob],
        )
        .unwrap();
        conn.execute(
            "UPDATE annals_aggregates SET version = 2 WHERE id = ?1",
            [&blob],
        )
        .unwrap();
        loads_the_restored_version(&cached, id).await;
    }

    #[tokio::test]
    async fn a_cached_load_reads_only_the_events_after_the_cached_version() {
        let (_dir, cached, other, conn) = open().await;
        let id = account_at_version_5(&cached).await;
        // An event the cache has already applied no longer decodes: only a full load reads it.
        conn.execute(
            "UPDATE annals_events SET payload = X'7B' WHERE aggregate_id = ?1 AND sequence = 3",
            [id.as_uuid().as_bytes().as_slice()],
        )
        .unwrap();
        only_full_loads_read_the_broken_event(&cached, &other, id).await;
    }

    #[tokio::test]
    async fn a_commit_in_the_callers_transaction_rolled_back_leaves_no_trace() {
        let (_dir, cached, other, mut conn) = open().await;
        let id = account_at_version_5(&cached).await;
        let ctx = staged_deposit(&cached, id, 1_000).await;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        ctx.commit_in_sqlite(&tx).unwrap();
        tx.rollback().unwrap();
        // Another handle commits version 6: the cached handle sees it, not the rolled-back one.
        deposit(&other, id, 5).await;
        assert_eq!(balance(&cached, id).await, (21, 6));

        // Committed by the caller, it is seen too.
        let ctx = staged_deposit(&cached, id, 7).await;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        ctx.commit_in_sqlite(&tx).unwrap();
        tx.commit().unwrap();
        assert_eq!(balance(&cached, id).await, (28, 7));
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    async fn open() -> Option<(support::Schema, Store, Store, sqlx::PgPool)> {
        let schema = support::fresh_schema()?;
        let cached = schema
            .open_with(schema.options().aggregate_cache(100))
            .await;
        let other = schema.open().await;
        let raw = schema.raw_pool().await;
        Some((schema, cached, other, raw))
    }

    #[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_restored_behind_the_cache_is_loaded_in_full() {
        let Some((schema, cached, _other, raw)) = open().await else {
            return;
        };
        let id = account_at_version_5(&cached).await;
        let table = |name: &str| format!("\"{}\".annals_{name}", schema.name);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {} WHERE aggregate_id = $1 AND sequence > 2",
            table("events")
        )))
        .bind(id.as_uuid())
        .execute(&raw)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET version = 2 WHERE id = $1",
            table("aggregates")
        )))
        .bind(id.as_uuid())
        .execute(&raw)
        .await
        .unwrap();
        loads_the_restored_version(&cached, id).await;
        cached.close().await;
    }

    #[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cached_load_reads_only_the_events_after_the_cached_version() {
        let Some((schema, cached, other, raw)) = open().await else {
            return;
        };
        let id = account_at_version_5(&cached).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE \"{}\".annals_events SET payload = '\\x7b' \
             WHERE aggregate_id = $1 AND sequence = 3",
            schema.name
        )))
        .bind(id.as_uuid())
        .execute(&raw)
        .await
        .unwrap();
        only_full_loads_read_the_broken_event(&cached, &other, id).await;
        cached.close().await;
    }

    #[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_in_the_callers_transaction_rolled_back_leaves_no_trace() {
        let Some((_schema, cached, other, raw)) = open().await else {
            return;
        };
        let id = account_at_version_5(&cached).await;
        let ctx = staged_deposit(&cached, id, 1_000).await;
        let mut tx = raw.begin().await.unwrap();
        ctx.commit_in(&mut tx).await.unwrap();
        tx.rollback().await.unwrap();
        deposit(&other, id, 5).await;
        assert_eq!(balance(&cached, id).await, (21, 6));

        let ctx = staged_deposit(&cached, id, 7).await;
        let mut tx = raw.begin().await.unwrap();
        ctx.commit_in(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(balance(&cached, id).await, (28, 7));
        cached.close().await;
    }
}
