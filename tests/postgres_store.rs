//! PostgreSQL-only behaviour: commits inside the caller's transaction, contention, a connection
//! lost mid-commit, wake-ups across store instances, migrations and configuration.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/postgres.rs"]
mod support;

use std::time::Duration;

use annals::prelude::*;
use annals::{Dialect, Error, FeedCursor, StoreOptions, migrations};
use conformance::domain::*;

const LIMIT: Duration = Duration::from_secs(120);

async fn place_order(store: &Store, raw: &sqlx::PgPool, table: &str, commit: bool) -> AggregateId {
    let mut tx = raw.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (number, total) VALUES ($1, $2)"
    )))
    .bind("INV-7")
    .bind(120_i64)
    .execute(&mut *tx)
    .await
    .unwrap();
    let mut ctx = store.begin();
    let mut account = ctx.create_with_key::<Account>("alice").await.unwrap();
    ctx.apply(
        &mut account,
        Opened {
            owner: "Alice".into(),
        },
    )
    .unwrap();
    ctx.apply(&mut account, Deposited { amount: 120 }).unwrap();
    ctx.commit_in(&mut tx).await.unwrap();
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    account.id()
}

async fn order_count(raw: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(raw)
        .await
        .unwrap()
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_in_user_transaction_rolled_back_writes_nothing() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;
    let id = place_order(&store, &raw, &table, false).await;

    assert_eq!(order_count(&raw, &table).await, 0);
    let mut ctx = store.begin_read_only();
    assert!(ctx.find_by_key::<Account>("alice").await.unwrap().is_none());
    assert!(matches!(
        ctx.load::<Account>(id).await,
        Err(Error::NotFound { .. })
    ));
    assert!(store.history(id).await.unwrap().is_empty());
    assert!(
        conformance::read_feed_to_end(&store, FeedCursor::START, 10)
            .await
            .is_empty()
    );
    // The key is free again.
    let again = place_order(&store, &raw, &table, true).await;
    assert_ne!(again, id);
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_in_user_transaction_committed_writes_both() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;
    let id = place_order(&store, &raw, &table, true).await;

    assert_eq!(order_count(&raw, &table).await, 1);
    let account = store
        .begin_read_only()
        .load_by_key::<Account>("alice")
        .await
        .unwrap();
    assert_eq!(
        (account.id(), account.balance, account.version()),
        (id, 120, 2)
    );
    let history = store.history(id).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2]
    );

    // A conflict inside the user's transaction is typed; the transaction is rolled back.
    let mut tx = raw.begin().await.unwrap();
    let mut stale = store.begin();
    let mut old = stale.load::<Account>(id).await.unwrap();
    stale.apply(&mut old, Deposited { amount: 1 }).unwrap();
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Withdrawn { amount: 20 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    match stale.commit_in(&mut tx).await {
        Err(Error::Conflict {
            aggregate,
            expected,
            actual,
            ..
        }) => {
            assert_eq!((aggregate, expected, actual), (id, 2, 3));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    tx.rollback().await.unwrap();
    let account = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((account.balance, account.version()), (100, 3));
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_in_needs_a_postgres_store() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let raw = schema.raw_pool().await;
    let memory = Store::open("memory:").await.unwrap();
    let mut ctx = memory.begin();
    let mut a = ctx.create::<Account>().unwrap();
    ctx.apply(&mut a, Opened { owner: "m".into() }).unwrap();
    let mut conn = raw.acquire().await.unwrap();
    assert!(matches!(
        ctx.commit_in(&mut conn).await,
        Err(Error::Config(_))
    ));
}

/// Counts a lost key race as a conflict too, so the retry helper re-runs a creation that lost.
#[derive(Debug)]
struct Retried(Error);

impl From<Error> for Retried {
    fn from(e: Error) -> Self {
        Retried(e)
    }
}

impl IsConflict for Retried {
    fn is_conflict(&self) -> bool {
        matches!(self.0, Error::Conflict { .. } | Error::KeyTaken { .. })
    }
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contention_on_one_aggregate_counts_to_1600() {
    const TASKS: u64 = 8;
    const INCREMENTS: u64 = 200;
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let store = schema.open_with(schema.options().pool_size(8)).await;
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    store
                        .transact_with_retry(Retry::attempts(10_000), async |ctx| {
                            let mut c = ctx.load_or_create_by_key::<Counter>("hot").await?;
                            ctx.apply(&mut c, CounterEvent::Incremented)?;
                            Ok::<_, Retried>(())
                        })
                        .await?;
                }
                Ok::<_, Retried>(())
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("task finished in time")
            .expect("task did not panic")
            .expect("no error reached the caller");
    }
    let counter = store
        .begin_read_only()
        .load_by_key::<Counter>("hot")
        .await
        .unwrap();
    assert_eq!((counter.value, counter.version()), (1600, 1600));
    assert_eq!(
        conformance::versions(&store, counter.id()).await,
        (1..=1600).collect::<Vec<u64>>(),
        "no gap"
    );
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lost_mid_commit_leaves_nothing() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let id = store
        .transact(async |ctx| {
            let mut a = ctx.create_with_key::<Account>("alice").await?;
            ctx.apply(
                &mut a,
                Opened {
                    owner: "Alice".into(),
                },
            )?;
            ctx.apply(&mut a, Deposited { amount: 10 })?;
            Ok::<_, Error>(a.id())
        })
        .await
        .unwrap();

    // Hold the aggregate's row, so the commit waits on it.
    let mut holder = raw.begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE id = $1 FOR UPDATE",
        schema.table("aggregates")
    )))
    .bind(*id.as_uuid())
    .execute(&mut *holder)
    .await
    .unwrap();

    let commit = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .transact(async |ctx| {
                    let mut a = ctx.load::<Account>(id).await?;
                    ctx.apply(&mut a, Deposited { amount: 5 })?;
                    Ok::<_, Error>(())
                })
                .await
        })
    };
    let blocked = async {
        loop {
            let pids: Vec<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(holder_pid)
            .fetch_all(&raw)
            .await
            .unwrap();
            if let Some(pid) = pids.first() {
                return *pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let pid = tokio::time::timeout(LIMIT, blocked)
        .await
        .expect("the commit waits on the row lock");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&raw)
        .await
        .unwrap();
    assert!(terminated);

    let outcome = tokio::time::timeout(LIMIT, commit)
        .await
        .expect("the commit returned")
        .expect("no panic");
    // The session ended before the commit's answer: to the caller its outcome is unknown (here
    // the server had not committed, as the history below shows), and never a conflict.
    match &outcome {
        Err(e @ Error::CommitOutcomeUnknown { aggregates, .. }) => {
            assert!(!e.is_conflict());
            assert_eq!(aggregates.as_slice(), [(id, 3)]);
        }
        other => panic!("expected CommitOutcomeUnknown, got {other:?}"),
    }
    holder.rollback().await.unwrap();

    let history = store.history(id).await.unwrap();
    assert_eq!(history.len(), 2, "nothing of the lost commit is stored");
    let account = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((account.balance, account.version()), (10, 2));
    // The pool replaced the lost connection.
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount: 5 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(store.history(id).await.unwrap().len(), 3);
    store.close().await;
}

/// The cursor after the first `count` events of the feed. Other tests on the server may hold
/// transactions open, which holds back the feed for a while: wait for them.
async fn feed_cursor_after(store: &Store, count: usize) -> FeedCursor {
    let work = async {
        loop {
            let page = store.read_feed(FeedCursor::START, count).await.unwrap();
            if page.len() == count {
                return page.last().unwrap().cursor;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("the feed delivered the events in time")
}

/// Opens `waiting` with a poll interval far longer than the test may take, so only a
/// notification can wake it in time.
async fn woken_by_other_instance(kill_listener: bool) {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let waiting = schema
        .open_with(schema.options().poll_interval(Duration::from_secs(60)))
        .await;
    let other = schema.open().await;
    let id = store_account(&other).await;
    let cursor = feed_cursor_after(&waiting, 1).await;
    assert!(
        !waiting
            .wait_for_events(cursor, Duration::from_millis(200))
            .await
            .unwrap()
    );

    if kill_listener {
        // The listening connection dies; the store reconnects and wakes its waiters then.
        let raw = schema.raw_pool().await;
        let listen = format!("LISTEN \"{}.annals_events\"", schema.name);
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1",
        )
        .bind(&listen)
        .fetch_all(&raw)
        .await
        .unwrap();
        assert_eq!(killed, [true]);
    }

    let waiter = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            waiting
                .wait_for_events(cursor, Duration::from_secs(50))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    other
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount: 1 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    // 30 s is well before the 60 s poll: only a wake-up ends the wait in time.
    let woken = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("woken before the poll interval")
        .expect("no panic")
        .unwrap();
    assert!(woken);
    waiting.close().await;
    other.close().await;
}

async fn store_account(store: &Store) -> AggregateId {
    store
        .transact(async |ctx| {
            let mut a = ctx.create::<Account>()?;
            ctx.apply(&mut a, Opened { owner: "w".into() })?;
            Ok::<_, Error>(a.id())
        })
        .await
        .unwrap()
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_is_woken_by_a_commit_of_another_instance() {
    woken_by_other_instance(false).await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_is_woken_after_the_listener_reconnects() {
    woken_by_other_instance(true).await;
}

async fn migration_rows(raw: &sqlx::PgPool, schema: &support::Schema) -> Vec<i64> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {} ORDER BY version",
        schema.table("schema_migrations")
    )))
    .fetch_all(raw)
    .await
    .unwrap()
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_at_once_migrate_once() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let url = schema.url.clone();
            let options = schema.options().pool_size(2);
            tokio::spawn(async move { Store::open_with(&url, options).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(
            tokio::time::timeout(LIMIT, open)
                .await
                .expect("opened in time")
                .expect("no panic")
                .expect("every instance opens"),
        );
    }
    let raw = schema.raw_pool().await;
    assert_eq!(migration_rows(&raw, &schema).await, [1, 2, 3, 4]);
    let types: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        schema.table("event_types")
    )))
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_eq!(types as usize, stores[0].registry().events().len());
    for store in stores {
        store.close().await;
    }
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused_untouched() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    store_account(&store).await;
    store.close().await;
    let raw = schema.raw_pool().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (version, name) VALUES (99, 'from the future')",
        schema.table("schema_migrations")
    )))
    .execute(&raw)
    .await
    .unwrap();
    for migrate in [true, false] {
        let result = Store::open_with(&schema.url, schema.options().migrate(migrate)).await;
        match result {
            Err(Error::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (99, 4));
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }
    assert_eq!(migration_rows(&raw, &schema).await, [1, 2, 3, 4, 99]);
    let events: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        schema.table("events")
    )))
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_eq!(events, 1);
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_store_without_migrate_is_refused_then_migrated_by_hand() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let options = schema.options().migrate(false);
    match Store::open_with(&schema.url, options.clone()).await {
        Err(Error::Config(message)) => {
            assert!(
                message.contains("annals::migrations(Dialect::Postgres"),
                "{message}"
            );
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let raw = schema.raw_pool().await;
    let exists = schema.exists().await;
    assert!(!exists, "nothing was created");

    for migration in annals::migrations(Dialect::Postgres, &options).unwrap() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(migration.sql))
            .execute(&raw)
            .await
            .unwrap();
    }
    let store = Store::open_with(&schema.url, options).await.unwrap();
    store_account(&store).await;
    assert_eq!(migration_rows(&raw, &schema).await, [1, 2, 3, 4]);
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_over_63_bytes_are_refused() {
    let Some(url) = support::database_url() else {
        return;
    };
    let schema = support::Schema::short(&url);
    // 41 bytes: the longest prefix; every table and index name still fits.
    let prefix = "p".repeat(41);
    let store = Store::open_with(&schema.url, schema.options().table_prefix(prefix.clone()))
        .await
        .unwrap();
    store_account(&store).await;
    store.close().await;
    let raw = schema.raw_pool().await;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 ORDER BY relname",
    )
    .bind(&schema.name)
    .fetch_all(&raw)
    .await
    .unwrap();
    assert!(
        names.contains(&format!("{prefix}schema_migrations_pk")),
        "{names:?}"
    );
    assert!(names.iter().all(|n| n.starts_with(&prefix)), "{names:?}");

    // With a long schema the notification channel would pass 63 bytes.
    let long_schema = format!("{}_{}", schema.name, "s".repeat(40 - schema.name.len()));
    let options = StoreOptions::new()
        .schema(long_schema.clone())
        .table_prefix(prefix)
        .pool_size(1);
    match Store::open_with(&schema.url, options).await {
        Err(Error::Config(message)) => assert!(message.contains("63"), "{message}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let exists: bool = sqlx::query_scalar("SELECT to_regnamespace($1) IS NOT NULL")
        .bind(&long_schema)
        .fetch_one(&raw)
        .await
        .unwrap();
    assert!(!exists);
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_written_by_another_process_are_read() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let id = store_account(&store).await;
    // Another program registers an event type this one does not know, and writes one.
    let raw = schema.raw_pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "WITH t AS (INSERT INTO {types} (name) VALUES ('account.audited') RETURNING id), \
              a AS (UPDATE {aggregates} SET version = 2 WHERE id = '{id}' RETURNING id) \
         INSERT INTO {events} (aggregate_id, sequence, event_type_id, schema_version, payload, \
                               recorded_at, event_id) \
         SELECT a.id, 2, t.id, 1, '{{}}'::bytea, now(), '{event}' FROM t, a",
        types = schema.table("event_types"),
        aggregates = schema.table("aggregates"),
        events = schema.table("events"),
        event = uuid::Uuid::now_v7(),
    )))
    .execute(&raw)
    .await
    .unwrap();
    let history = store.history(id).await.unwrap();
    let names: Vec<&str> = history.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(names, ["account.opened", "account.audited"]);
    // Loading it as an Account names the event it cannot apply.
    match store.begin_read_only().load::<Account>(id).await {
        Err(Error::UnknownEventType {
            event_type,
            position,
            ..
        }) => {
            assert_eq!(
                (event_type.as_str(), position),
                ("account.audited", history[1].position())
            );
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_aggregate_conflict_writes_nothing() {
    let Some((store, _schema)) = support::open_fresh().await else {
        return;
    };
    let (x, y) = (store_account(&store).await, store_account(&store).await);
    let mut stale = store.begin();
    let mut sx = stale.load::<Account>(x).await.unwrap();
    let mut sy = stale.load::<Account>(y).await.unwrap();
    stale.apply(&mut sx, Deposited { amount: 1 }).unwrap();
    stale.apply(&mut sy, Deposited { amount: 1 }).unwrap();
    let mut fresh = stale.create::<Account>().unwrap();
    stale
        .apply(
            &mut fresh,
            Opened {
                owner: "new".into(),
            },
        )
        .unwrap();
    // Only Y moves meanwhile.
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(y).await?;
            ctx.apply(&mut a, Deposited { amount: 5 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    match stale.commit().await {
        Err(Error::Conflict {
            aggregate,
            expected,
            actual,
            ..
        }) => {
            assert_eq!((aggregate, expected, actual), (y, 1, 2));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let mut ctx = store.begin_read_only();
    assert_eq!(
        ctx.load::<Account>(x).await.unwrap().version(),
        1,
        "X untouched"
    );
    assert_eq!(ctx.load::<Account>(y).await.unwrap().version(), 2);
    assert!(matches!(
        ctx.load::<Account>(fresh.id()).await,
        Err(Error::NotFound { .. })
    ));
    let stored = store.history(x).await.unwrap().len() + store.history(y).await.unwrap().len();
    assert_eq!(stored, 3);
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfers_in_opposite_orders_do_not_deadlock() {
    const TASKS: usize = 4;
    const TRANSFERS: usize = 50;
    let Some(url) = support::database_url() else {
        return;
    };
    // A database of its own: its deadlock count is this test's alone. A deadlock would be
    // retried as a conflict, so the count is what tells.
    let database = support::Database::create(&url).await;
    let store = Store::open_with(&database.url, StoreOptions::new().pool_size(4))
        .await
        .unwrap();
    let (x, y) = (store_account(&store).await, store_account(&store).await);
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..TRANSFERS {
                    // Half the tasks load and stage X first, the others Y first.
                    let (from, to) = if (t + i) % 2 == 0 { (x, y) } else { (y, x) };
                    store
                        .transact_with_retry(Retry::attempts(10_000), async move |ctx| {
                            let mut a = ctx.load::<Account>(from).await?;
                            let mut b = ctx.load::<Account>(to).await?;
                            ctx.apply(&mut a, Withdrawn { amount: 1 })?;
                            ctx.apply(&mut b, Deposited { amount: 1 })?;
                            Ok::<_, Error>(())
                        })
                        .await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("finished in time")
            .expect("no panic")
            .expect("no error reached the caller");
    }
    let mut ctx = store.begin_read_only();
    let (a, b) = (
        ctx.load::<Account>(x).await.unwrap(),
        ctx.load::<Account>(y).await.unwrap(),
    );
    assert_eq!(a.balance + b.balance, 0);
    assert_eq!(
        a.version() + b.version(),
        2 + 2 * (TASKS * TRANSFERS) as u64
    );
    store.close().await;
    assert_eq!(database.deadlocks().await, 0);
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creating_keys_in_opposite_orders_does_not_deadlock() {
    const ROUNDS: usize = 100;
    const PAIRS: usize = 4;
    let Some(url) = support::database_url() else {
        return;
    };
    let database = support::Database::create(&url).await;
    let store = Store::open_with(&database.url, StoreOptions::new().pool_size(8))
        .await
        .unwrap();
    let create = |first: String, second: String| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .transact(async move |ctx| {
                    let mut a = ctx.create_with_key::<Account>(&first).await?;
                    let mut b = ctx.create_with_key::<Account>(&second).await?;
                    ctx.apply(
                        &mut a,
                        Opened {
                            owner: first.clone(),
                        },
                    )?;
                    ctx.apply(
                        &mut b,
                        Opened {
                            owner: second.clone(),
                        },
                    )?;
                    Ok::<_, Error>(())
                })
                .await
        })
    };
    for round in 0..ROUNDS {
        // A few pairs at once, each pair racing for its two keys in opposite orders.
        let pairs: Vec<_> = (0..PAIRS)
            .map(|pair| {
                let (x, y) = (format!("x-{round}-{pair}"), format!("y-{round}-{pair}"));
                (create(x.clone(), y.clone()), create(y, x))
            })
            .collect();
        for (one, other) in pairs {
            let (one, other) = tokio::time::timeout(LIMIT, async { (one.await, other.await) })
                .await
                .expect("both finished in time");
            // One creates both keys; the other finds them taken, at creation or at commit.
            match (one.expect("no panic"), other.expect("no panic")) {
                (Ok(()), Err(Error::KeyTaken { .. })) | (Err(Error::KeyTaken { .. }), Ok(())) => {}
                other => {
                    panic!("round {round}: expected one commit and one KeyTaken, got {other:?}")
                }
            }
        }
    }
    store.close().await;
    assert_eq!(database.deadlocks().await, 0);
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_of_other_prefixes_create_one_schema_at_once() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let opens: Vec<_> = (0..4)
        .map(|i| {
            let url = schema.url.clone();
            let options = schema.options().pool_size(2).table_prefix(format!("p{i}_"));
            tokio::spawn(async move { Store::open_with(&url, options).await })
        })
        .collect();
    for open in opens {
        let store = tokio::time::timeout(LIMIT, open)
            .await
            .expect("opened in time")
            .expect("no panic")
            .expect("every store opens");
        store_account(&store).await;
        store.close().await;
    }
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test]
async fn reserved_words_work_as_schema_names_and_pg_names_are_refused() {
    let Some(url) = support::database_url() else {
        return;
    };
    for name in ["user", "order"] {
        let schema = support::Schema {
            url: url.clone(),
            name: name.to_owned(),
        };
        let store = schema.open().await;
        let id = conformance::open_account(&store, &format!("acct-{name}"), "ann", 5).await;
        assert_eq!(conformance::versions(&store, id).await, [1, 2]);
        let feed = conformance::read_feed_to_end(&store, FeedCursor::START, 10).await;
        assert!(
            feed.iter().any(|e| e.aggregate_id == id),
            "{name}: {feed:?}"
        );
        let sql = migrations(Dialect::Postgres, &schema.options()).unwrap();
        assert!(sql[0].sql.contains(&format!("\"{name}\".annals_events")));
        store.close().await;
    }
    // PostgreSQL reserves pg_ names for itself: refused before anything is sent.
    let options = StoreOptions::new().schema("pg_x");
    for refused in [
        Store::open_with(&url, options.clone()).await.map(drop),
        migrations(Dialect::Postgres, &options).map(drop),
    ] {
        match refused {
            Err(Error::Config(message)) => assert!(message.contains("pg_"), "{message}"),
            other => panic!("expected Config, got {other:?}"),
        }
    }
}

/// A deposit to `id` committed through `commit_in` in `tx`.
async fn deposit_in(
    store: &Store,
    tx: &mut sqlx::PgConnection,
    id: AggregateId,
) -> Result<(), Error> {
    let mut ctx = store.begin();
    let mut account = ctx.load::<Account>(id).await?;
    ctx.apply(&mut account, Deposited { amount: 1 })?;
    ctx.commit_in(tx).await.map(drop)
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_in_at_each_isolation_level() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;
    for level in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        let x = conformance::open_account(&store, &format!("x {level}"), "x", 0).await;

        // Loaded before the transaction's first statement: it commits at every level.
        let mut tx = support::begin_at(&raw, level).await;
        deposit_in(&store, &mut tx, x).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(conformance::versions(&store, x).await, [1, 2], "{level}");

        // The transaction's snapshot comes first (it reads its own table), then another
        // commit extends X, and only then does the context load X.
        let mut tx = support::begin_at(&raw, level).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .execute(&mut *tx)
            .await
            .unwrap();
        let mut other = store.begin();
        let mut account = other.load::<Account>(x).await.unwrap();
        other.apply(&mut account, Deposited { amount: 5 }).unwrap();
        other.commit().await.unwrap();
        let outcome = deposit_in(&store, &mut tx, x).await;
        if level == "READ COMMITTED" {
            // Each statement sees the latest commit: the version check passes.
            outcome.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(conformance::versions(&store, x).await, [1, 2, 3, 4]);
        } else {
            match outcome {
                Err(e @ Error::StaleTransaction { .. }) => {
                    assert!(e.is_conflict(), "re-running the unit of work resolves it");
                    assert!(
                        e.to_string().contains("REPEATABLE READ or SERIALIZABLE"),
                        "{e}"
                    );
                    match e {
                        Error::StaleTransaction {
                            aggregate, loaded, ..
                        } => assert_eq!((aggregate, loaded), (x, 3)),
                        _ => unreachable!(),
                    }
                }
                other => panic!("{level}: expected StaleTransaction, got {other:?}"),
            }
            tx.rollback().await.unwrap();
            assert_eq!(conformance::versions(&store, x).await, [1, 2, 3], "{level}");
        }
    }
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_only_role_opens_the_store_read_only() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let id = conformance::open_account(&store, "alice", "Alice", 5).await;
    let role = format!("annals_ro_{}", &schema.name[2..14]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN; \
         GRANT USAGE ON SCHEMA \"{schema}\" TO {role}; \
         GRANT SELECT ON ALL TABLES IN SCHEMA \"{schema}\" TO {role};",
        schema = schema.name
    )))
    .execute(&raw)
    .await
    .unwrap();
    let url = support::with_user(&schema.url, &role);

    // Read-write, it cannot open: the error says how to open it.
    match Store::open_with(&url, schema.options()).await {
        Err(Error::Config(message)) => {
            assert!(message.contains("read_only(true)"), "{message}")
        }
        other => panic!("expected Config, got {other:?}"),
    }
    // Read-only, it loads, reads histories and the feed, and refuses to stage events.
    let reader = Store::open_with(&url, schema.options().read_only(true))
        .await
        .unwrap();
    let mut ctx = reader.begin();
    let mut alice = ctx.load::<Account>(id).await.unwrap();
    assert_eq!((alice.balance, alice.version()), (5, 2));
    assert!(matches!(
        ctx.apply(&mut alice, Deposited { amount: 1 }),
        Err(Error::ReadOnly)
    ));
    assert_eq!(reader.history(id).await.unwrap().len(), 2);
    let feed = conformance::read_feed_to_end(&reader, FeedCursor::START, 10).await;
    assert_eq!(feed.len(), 2);
    assert!(
        reader
            .begin_read_only()
            .find_by_key::<Account>("alice")
            .await
            .unwrap()
            .is_some()
    );
    reader.close().await;
    store.close().await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role};"
    )))
    .execute(&raw)
    .await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test]
async fn a_store_at_schema_version_1_is_migrated_to_feed_epochs() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let raw = schema.raw_pool().await;
    // The schema as the first release left it: version 1 only.
    let first = migrations(Dialect::Postgres, &schema.options())
        .unwrap()
        .remove(0);
    assert_eq!(first.version, 1);
    sqlx::raw_sql(sqlx::AssertSqlSafe(first.sql))
        .execute(&raw)
        .await
        .unwrap();
    let store = schema.open().await;
    assert_eq!(migration_rows(&raw, &schema).await, [1, 2, 3, 4]);
    let id = conformance::open_account(&store, "alice", "Alice", 3).await;
    let feed = conformance::read_feed_to_end(&store, FeedCursor::START, 10).await;
    assert_eq!(feed.len(), 2);
    assert!(
        feed.iter()
            .all(|e| e.aggregate_id == id && e.cursor.epoch == 0)
    );
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_unknown_and_not_retried() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let id = conformance::open_account(&store, "alice", "Alice", 10).await;
    // Through the proxy, the commit's parameters (which hold the payload) reach the server,
    // which commits them, and the answer never comes back.
    let proxy = support::CuttingProxy::start(&schema.url, b"987654321").await;
    let through = Store::open_with(
        &proxy.url,
        schema.options().pool_size(1).listen(annals::Listen::Off),
    )
    .await
    .unwrap();
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let outcome = through
        .transact_with_retry(Retry::attempts(5), async |ctx| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut account = ctx.load::<Account>(id).await?;
            ctx.apply(
                &mut account,
                Deposited {
                    amount: 987_654_321,
                },
            )?;
            Ok::<_, Error>(())
        })
        .await;
    match &outcome {
        Err(e @ Error::CommitOutcomeUnknown { aggregates, .. }) => {
            assert!(!e.is_conflict());
            assert_eq!(aggregates.as_slice(), [(id, 3)]);
        }
        other => panic!("expected CommitOutcomeUnknown, got {other:?}"),
    }
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the retry helper does not re-run a commit of unknown outcome"
    );
    // The way to resolve it: read the version. Here the server had committed.
    assert_eq!(conformance::versions(&store, id).await, [1, 2, 3]);
    through.close().await;
    store.close().await;
}

/// The retry of a commit whose answer was lost, with the same idempotency key: recognised as
/// already committed, nothing written twice, no conflict.
#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_answer_is_already_committed() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let id = conformance::open_account(&store, "alice", "Alice", 10).await;
    let proxy = support::CuttingProxy::start(&schema.url, b"123456789").await;
    let through = Store::open_with(
        &proxy.url,
        schema.options().pool_size(1).listen(annals::Listen::Off),
    )
    .await
    .unwrap();
    let request = uuid::Uuid::now_v7();
    let deposit = async |store: &Store| {
        let mut ctx = store.begin();
        ctx.set_idempotency_key(request);
        let mut account = ctx.load::<Account>(id).await?;
        ctx.apply(
            &mut account,
            Deposited {
                amount: 123_456_789,
            },
        )?;
        ctx.commit().await
    };
    // The server commits; the answer is cut.
    match deposit(&through).await {
        Err(Error::CommitOutcomeUnknown { .. }) => {}
        other => panic!("expected CommitOutcomeUnknown, got {other:?}"),
    }
    assert_eq!(conformance::versions(&store, id).await, [1, 2, 3]);
    // The retry, through the proxy again (on a new connection) and straight to the server.
    assert!(deposit(&through).await.unwrap().already_committed());
    assert!(deposit(&store).await.unwrap().already_committed());
    assert_eq!(conformance::versions(&store, id).await, [1, 2, 3]);
    let account = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!(account.balance, 10 + 123_456_789);
    through.close().await;
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_opens_on_the_applications_pool_or_connect_options() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    // The application's own pool: the store runs on its connections.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&schema.url)
        .await
        .unwrap();
    let store = Store::open_postgres_pool(pool.clone(), schema.options())
        .await
        .unwrap();
    let id = conformance::open_account(&store, "alice", "Alice", 4).await;
    assert_eq!(conformance::versions(&store, id).await, [1, 2]);
    assert!(pool.size() >= 1 && pool.size() <= 2, "{}", pool.size());

    // Connection options built in code, and pool options from StoreOptions.
    let connect: sqlx::postgres::PgConnectOptions = schema.url.parse().unwrap();
    let options = schema
        .options()
        .min_connections(2)
        .acquire_timeout(Duration::from_secs(10));
    let other = Store::open_postgres(connect.application_name("annals-test"), options)
        .await
        .unwrap();
    let alice = other
        .begin_read_only()
        .load_by_key::<Account>("alice")
        .await
        .unwrap();
    assert_eq!(alice.balance, 4);
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE application_name = 'annals-test'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        !names.is_empty(),
        "the store connected with the given options"
    );

    // Pool options are checked.
    match Store::open_postgres(
        schema.url.parse().unwrap(),
        schema.options().pool_size(2).min_connections(3),
    )
    .await
    {
        Err(Error::Config(message)) => assert!(message.contains("min connections"), "{message}"),
        other => panic!("expected Config, got {other:?}"),
    }
    other.close().await;
    store.close().await;
    // Closing the store leaves the application's pool open.
    sqlx::query("SELECT 1").execute(&pool).await.unwrap();
    pool.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test]
async fn another_applications_table_is_never_adopted() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let raw = schema.raw_pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA \"{s}\"; CREATE TABLE \"{s}\".annals_events (note text); \
         INSERT INTO \"{s}\".annals_events VALUES ('theirs');",
        s = schema.name
    )))
    .execute(&raw)
    .await
    .unwrap();
    for migrate in [true, false] {
        match Store::open_with(&schema.url, schema.options().migrate(migrate)).await {
            Err(Error::ForeignTable { table }) => {
                assert_eq!(table, format!("{}.annals_events", schema.name))
            }
            other => panic!("migrate({migrate}): expected ForeignTable, got {other:?}"),
        }
    }
    // Untouched: their table as it was, no table of annals beside it.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(&schema.name)
    .fetch_all(&raw)
    .await
    .unwrap();
    assert_eq!(tables, ["annals_events"]);
    let notes: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT note FROM {}",
        schema.table("events")
    )))
    .fetch_all(&raw)
    .await
    .unwrap();
    assert_eq!(notes, ["theirs"]);
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_the_newest_event_of_the_store() {
    let Some((store, _schema)) = support::open_fresh().await else {
        return;
    };
    // Five ticks in one commit: the snapshot at 5 covers every event, and the fifth is the
    // newest of the store, which the feed-epoch check reads.
    let mut ctx = store.begin();
    let mut meter = ctx.create::<Meter>().unwrap();
    for _ in 0..5 {
        ctx.apply(&mut meter, Ticked).unwrap();
    }
    let id = meter.id();
    ctx.commit().await.unwrap();
    assert_eq!(store.prune_events(id).await.unwrap(), 4);
    assert_eq!(store.history(id).await.unwrap()[0].version, 5);
    // Once a newer event exists elsewhere, it goes too.
    conformance::open_account(&store, "later", "Lat", 0).await;
    assert_eq!(store.prune_events(id).await.unwrap(), 1);
    assert!(store.history(id).await.unwrap().is_empty());
    let meter = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!(
        (meter.ticks, meter.version(), meter.applied_since_load),
        (5, 5, 0)
    );
}
