//! Contexts bound to the caller's PostgreSQL transaction (`Store::begin_in`): they load,
//! commit and diagnose failures over that one connection, see what the transaction wrote, and
//! leave it usable after a failed commit.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/postgres.rs"]
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use annals::prelude::*;
use annals::{Error, FeedCursor, Listen, TxContext};
use conformance::domain::*;
use sqlx::PgConnection;
use tokio::sync::Barrier;

const LIMIT: Duration = Duration::from_secs(120);

async fn insert_order(conn: &mut PgConnection, table: &str, number: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (number, total) VALUES ($1, 1)"
    )))
    .bind(number)
    .execute(conn)
    .await
    .unwrap();
}

async fn order_numbers(raw: &sqlx::PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT number FROM {table} ORDER BY number"
    )))
    .fetch_all(raw)
    .await
    .unwrap()
}

/// Deposits 1 to `id` in a context bound to `conn`'s transaction.
async fn deposit_bound(
    store: &Store,
    conn: &mut PgConnection,
    id: AggregateId,
) -> Result<(), Error> {
    let mut ctx = store.begin_in(conn)?;
    let mut account = ctx.load::<Account>(id).await?;
    ctx.apply(&mut account, Deposited { amount: 1 })?;
    ctx.commit().await.map(drop)
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_context_commits_with_the_callers_own_writes() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;

    for commit in [false, true] {
        let mut tx = raw.begin().await.unwrap();
        insert_order(&mut tx, &table, "INV-1").await;
        let mut ctx = store.begin_in(&mut tx).unwrap();
        let mut alice = ctx.create_with_key::<Account>("alice").await.unwrap();
        ctx.apply(
            &mut alice,
            Opened {
                owner: "Alice".into(),
            },
        )
        .unwrap();
        insert_order(ctx.connection(), &table, "INV-2").await;
        ctx.apply(&mut alice, Deposited { amount: 120 }).unwrap();
        ctx.commit().await.unwrap();

        // Staged in the transaction, not yet visible.
        let mut outside = store.begin_read_only();
        assert!(
            outside
                .find_by_key::<Account>("alice")
                .await
                .unwrap()
                .is_none()
        );
        assert!(order_numbers(&raw, &table).await.is_empty());
        // The transaction itself sees them.
        let seen: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            schema.table("events")
        )))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(seen, 2);

        if commit {
            tx.commit().await.unwrap();
            assert_eq!(order_numbers(&raw, &table).await, ["INV-1", "INV-2"]);
            let account = store
                .begin_read_only()
                .load_by_key::<Account>("alice")
                .await
                .unwrap();
            assert_eq!(
                (account.id(), account.balance, account.version()),
                (alice.id(), 120, 2)
            );
            let feed = conformance::read_feed_to_end(&store, FeedCursor::START, 10).await;
            assert_eq!(
                feed.iter()
                    .map(|e| e.event_type.as_str())
                    .collect::<Vec<_>>(),
                ["account.opened", "account.deposited"]
            );
        } else {
            tx.rollback().await.unwrap();
            assert!(order_numbers(&raw, &table).await.is_empty());
            assert!(
                store
                    .begin_read_only()
                    .find_by_key::<Account>("alice")
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(store.history(alice.id()).await.unwrap().is_empty());
            assert!(
                conformance::read_feed_to_end(&store, FeedCursor::START, 10)
                    .await
                    .is_empty()
            );
        }
    }
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_bound_context_sees_the_first_ones_uncommitted_events() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let mut tx = raw.begin().await.unwrap();

    let mut first = store.begin_in(&mut tx).unwrap();
    let mut alice = first.create_with_key::<Account>("alice").await.unwrap();
    first
        .apply(
            &mut alice,
            Opened {
                owner: "Alice".into(),
            },
        )
        .unwrap();
    first.apply(&mut alice, Deposited { amount: 10 }).unwrap();
    first.commit().await.unwrap();

    let mut second = store.begin_in(&mut tx).unwrap();
    // The key is taken by the first context's uncommitted aggregate.
    assert!(matches!(
        second.create_with_key::<Account>("alice").await,
        Err(Error::KeyTaken { .. })
    ));
    let mut again = second.load_by_key::<Account>("alice").await.unwrap();
    assert_eq!(
        (again.id(), again.balance, again.version()),
        (alice.id(), 10, 2)
    );
    let by_id = second.load::<Account>(alice.id()).await.unwrap();
    assert_eq!(by_id.version(), 2);
    let found = second
        .find_by_key::<Account>("alice")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.balance, 10);
    second.apply(&mut again, Deposited { amount: 5 }).unwrap();
    // The chosen id is checked over the transaction too.
    assert!(matches!(
        second.create_with_id::<Account>(alice.id()).await,
        Err(Error::IdTaken { .. })
    ));
    second.commit().await.unwrap();

    let mut third = store.begin_in(&mut tx).unwrap();
    let mut signup = third
        .load_or_create_by_key::<Account>("alice")
        .await
        .unwrap();
    assert_eq!(signup.version(), 3);
    third.apply(&mut signup, Withdrawn { amount: 1 }).unwrap();
    third.commit().await.unwrap();

    // Nothing is visible outside until the transaction commits.
    assert!(store.history(alice.id()).await.unwrap().is_empty());
    tx.commit().await.unwrap();
    assert_eq!(
        conformance::versions(&store, alice.id()).await,
        [1, 2, 3, 4]
    );
    let account = store
        .begin_read_only()
        .load::<Account>(alice.id())
        .await
        .unwrap();
    assert_eq!(account.balance, 14);
    let feed = conformance::read_feed_to_end(&store, FeedCursor::START, 10).await;
    assert_eq!(
        feed.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_leaves_the_transaction_usable_and_without_the_context() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;
    let x = conformance::open_account(&store, "x", "x", 5).await;

    // Two units load X in transactions of their own; the second commits first.
    let mut tx1 = raw.begin().await.unwrap();
    insert_order(&mut tx1, &table, "one-before").await;
    let mut first = store.begin_in(&mut tx1).unwrap();
    let mut a = first.load::<Account>(x).await.unwrap();
    first.apply(&mut a, Withdrawn { amount: 1 }).unwrap();

    let mut tx2 = raw.begin().await.unwrap();
    deposit_bound(&store, &mut tx2, x).await.unwrap();
    // The first unit's version check waits for the second transaction's row lock, then fails.
    let (outcome, ()) = tokio::join!(first.commit(), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx2.commit().await.unwrap();
    });
    match outcome {
        Err(e @ Error::Conflict { .. }) => {
            assert!(e.is_conflict());
            match e {
                Error::Conflict {
                    aggregate,
                    expected,
                    actual,
                    ..
                } => assert_eq!((aggregate, expected, actual), (x, 2, 3)),
                _ => unreachable!(),
            }
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The transaction goes on: its writes before and after the failed commit are kept, and
    // nothing of the context is in it.
    insert_order(&mut tx1, &table, "one-after").await;
    let staged: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {} WHERE aggregate_id = $1",
        schema.table("events")
    )))
    .bind(*x.as_uuid())
    .fetch_one(&mut *tx1)
    .await
    .unwrap();
    assert_eq!(staged, 3);
    // Re-run inside the same transaction (READ COMMITTED reads the newer version).
    deposit_bound(&store, &mut tx1, x).await.unwrap();
    tx1.commit().await.unwrap();
    assert_eq!(
        order_numbers(&raw, &table).await,
        ["one-after", "one-before"]
    );
    assert_eq!(conformance::versions(&store, x).await, [1, 2, 3, 4]);
    let account = store.begin_read_only().load::<Account>(x).await.unwrap();
    assert_eq!(account.balance, 7);
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_keys_and_ids_are_typed_and_leave_the_transaction_usable() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;
    conformance::open_account(&store, "alice", "Alice", 0).await;

    let mut tx = raw.begin().await.unwrap();
    insert_order(&mut tx, &table, "kept").await;
    let mut ctx = store.begin_in(&mut tx).unwrap();
    // Committed before: refused at once.
    assert!(matches!(
        ctx.create_with_key::<Account>("alice").await,
        Err(Error::KeyTaken { .. })
    ));
    // Committed by another unit after this context checked it: refused at commit.
    let mut bob = ctx.create_with_key::<Account>("bob").await.unwrap();
    ctx.apply(
        &mut bob,
        Opened {
            owner: "Bob".into(),
        },
    )
    .unwrap();
    conformance::open_account(&store, "bob", "other Bob", 0).await;
    match ctx.commit().await {
        Err(Error::KeyTaken {
            aggregate_type,
            key,
        }) => assert_eq!((aggregate_type.as_str(), key.as_str()), ("account", "bob")),
        other => panic!("expected KeyTaken, got {other:?}"),
    }

    // An id taken meanwhile.
    let chosen = AggregateId::from(uuid::Uuid::now_v7());
    let mut ctx = store.begin_in(&mut tx).unwrap();
    let mut mine = ctx.create_with_id::<Account>(chosen).await.unwrap();
    ctx.apply(&mut mine, Opened { owner: "me".into() }).unwrap();
    let mut other = store.begin();
    let mut theirs = other.create_with_id::<Counter>(chosen).await.unwrap();
    other.apply(&mut theirs, CounterEvent::Incremented).unwrap();
    other.commit().await.unwrap();
    match ctx.commit().await {
        Err(Error::IdTaken {
            aggregate,
            found_type,
        }) => assert_eq!((aggregate, found_type.as_str()), (chosen, "counter")),
        other => panic!("expected IdTaken, got {other:?}"),
    }
    // Committed before: refused at once.
    let mut ctx = store.begin_in(&mut tx).unwrap();
    assert!(matches!(
        ctx.create_with_id::<Account>(chosen).await,
        Err(Error::IdTaken { .. })
    ));
    drop(ctx);

    // The transaction still commits, with its own row and none of the failed contexts.
    insert_order(&mut tx, &table, "kept too").await;
    tx.commit().await.unwrap();
    assert_eq!(order_numbers(&raw, &table).await, ["kept", "kept too"]);
    let bob = store
        .begin_read_only()
        .load_by_key::<Account>("bob")
        .await
        .unwrap();
    assert_eq!((bob.owner.as_str(), bob.version()), ("other Bob", 1));
    assert_eq!(conformance::versions(&store, chosen).await, [1]);
    store.close().await;
}

/// A unit of work in a transaction of its own, with a bound context, re-run on a conflict:
/// signs up `key` (opening it the first time) and deposits 1. Returns the aggregate's id and
/// how many attempts it took.
async fn sign_up(
    store: &Store,
    raw: &sqlx::PgPool,
    key: &str,
    barrier: Option<&Barrier>,
) -> Result<(AggregateId, u32), Error> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts <= 100, "a signup that never commits");
        let mut tx = raw.begin().await.unwrap();
        let mut ctx = store.begin_in(&mut tx)?;
        let mut account = ctx.load_or_create_by_key::<Account>(key).await?;
        if account.version() == 0 {
            ctx.apply(&mut account, Opened { owner: key.into() })?;
        }
        ctx.apply(&mut account, Deposited { amount: 1 })?;
        if attempts == 1
            && let Some(barrier) = barrier
        {
            barrier.wait().await;
        }
        match ctx.commit().await {
            Ok(_) => {
                tx.commit().await.unwrap();
                return Ok((account.id(), attempts));
            }
            Err(e) if e.is_conflict() => tx.rollback().await.unwrap(),
            Err(e) => return Err(e),
        }
    }
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_or_create_race_is_a_conflict_that_a_retry_resolves() {
    const TASKS: usize = 8;
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let store = schema.open_with(schema.options().pool_size(2)).await;
    let raw = sqlx::postgres::PgPoolOptions::new()
        .max_connections(TASKS as u32 + 1)
        .connect(&schema.url)
        .await
        .unwrap();

    // Two units create one key; the later commit is a conflict, not KeyTaken.
    let mut tx1 = raw.begin().await.unwrap();
    let mut tx2 = raw.begin().await.unwrap();
    let mut first = store.begin_in(&mut tx1).unwrap();
    let mut second = store.begin_in(&mut tx2).unwrap();
    let mut a = first
        .load_or_create_by_key::<Account>("late")
        .await
        .unwrap();
    let mut b = second
        .load_or_create_by_key::<Account>("late")
        .await
        .unwrap();
    first.apply(&mut a, Deposited { amount: 1 }).unwrap();
    second.apply(&mut b, Deposited { amount: 2 }).unwrap();
    first.commit().await.unwrap();
    tx1.commit().await.unwrap();
    match second.commit().await {
        Err(Error::Conflict {
            aggregate,
            expected,
            actual,
            ..
        }) => assert_eq!((aggregate, expected, actual), (b.id(), 0, 1)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    tx2.rollback().await.unwrap();

    // Many units sign one key up at once, each retrying in a new transaction.
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (store, raw, barrier) = (store.clone(), raw.clone(), barrier.clone());
            tokio::spawn(async move { sign_up(&store, &raw, "signup", Some(&barrier)).await })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut retried = 0;
    for task in tasks {
        let (id, attempts) = tokio::time::timeout(LIMIT, task)
            .await
            .expect("finished in time")
            .expect("no panic")
            .expect("every signup commits");
        ids.insert(id);
        retried += u32::from(attempts > 1);
    }
    assert_eq!(ids.len(), 1, "one aggregate for the key");
    assert!(retried >= 1, "the units that lost the race were re-run");
    let account = store
        .begin_read_only()
        .load_by_key::<Account>("signup")
        .await
        .unwrap();
    assert_eq!(
        (account.balance, account.version()),
        (TASKS as i64, TASKS as u64 + 1)
    );
    store.close().await;
    raw.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_context_works_at_each_isolation_level() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;
    for level in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        let x = conformance::open_account(&store, &format!("x {level}"), "x", 0).await;

        // A simple unit: the caller's row and a deposit, together.
        let mut tx = support::begin_at(&raw, level).await;
        insert_order(&mut tx, &table, &format!("{level} 1")).await;
        deposit_bound(&store, &mut tx, x).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(conformance::versions(&store, x).await, [1, 2], "{level}");

        // The transaction's snapshot comes first, then another unit extends X, and only then
        // does the bound context load X.
        let mut tx = support::begin_at(&raw, level).await;
        insert_order(&mut tx, &table, &format!("{level} 2")).await;
        let mut other = store.begin();
        let mut account = other.load::<Account>(x).await.unwrap();
        other.apply(&mut account, Deposited { amount: 5 }).unwrap();
        other.commit().await.unwrap();
        let mut ctx = store.begin_in(&mut tx).unwrap();
        let mut seen = ctx.load::<Account>(x).await.unwrap();
        ctx.apply(&mut seen, Deposited { amount: 1 }).unwrap();
        let outcome = ctx.commit().await;
        if level == "READ COMMITTED" {
            // Each statement sees the latest commit.
            assert_eq!(seen.version(), 4);
            outcome.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(conformance::versions(&store, x).await, [1, 2, 3, 4]);
        } else {
            // The load read the transaction's snapshot: the version another unit committed
            // after it cannot be built on, and re-running the unit resolves it.
            assert_eq!(seen.version(), 3, "{level}");
            match outcome {
                Err(e @ Error::Conflict { .. }) => assert!(e.is_conflict()),
                other => panic!("{level}: expected a conflict, got {other:?}"),
            }
            tx.rollback().await.unwrap();
            assert_eq!(conformance::versions(&store, x).await, [1, 2, 3], "{level}");
            let mut tx = support::begin_at(&raw, level).await;
            insert_order(&mut tx, &table, &format!("{level} 2")).await;
            deposit_bound(&store, &mut tx, x).await.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(conformance::versions(&store, x).await, [1, 2, 3, 4]);
        }
    }
    assert_eq!(order_numbers(&raw, &table).await.len(), 6);
    store.close().await;
}

/// How a unit creates an account.
#[derive(Debug, Clone, Copy)]
enum New<'a> {
    Key(&'a str),
    LoadOrCreate(&'a str),
    Id(AggregateId),
}

/// Whether a commit's error is the one expected.
type IsExpected = fn(&Error) -> bool;

/// Stages the opening of an account created `how` in `ctx`.
async fn stage_open(ctx: &mut TxContext<'_>, how: New<'_>) -> Result<Root<Account>, Error> {
    let mut account = match how {
        New::Key(key) => ctx.create_with_key::<Account>(key).await?,
        New::LoadOrCreate(key) => ctx.load_or_create_by_key::<Account>(key).await?,
        New::Id(id) => ctx.create_with_id::<Account>(id).await?,
    };
    ctx.apply(
        &mut account,
        Opened {
            owner: format!("{how:?}"),
        },
    )?;
    Ok(account)
}

/// Opens an account created `how` in a bound unit of its own, and commits it.
async fn open_bound(store: &Store, raw: &sqlx::PgPool, how: New<'_>) {
    let mut tx = raw.begin().await.unwrap();
    let mut ctx = store.begin_in(&mut tx).unwrap();
    stage_open(&mut ctx, how).await.unwrap();
    ctx.commit().await.unwrap();
    tx.commit().await.unwrap();
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_unit_takes_no_connection_from_the_stores_pool() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    // The store's pool: two connections, every one of them checked out below. A bound unit
    // that asked it for one would wait for the whole acquire timeout.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3600))
        .connect(&schema.url)
        .await
        .unwrap();
    let store = Store::open_postgres_pool(pool.clone(), schema.options().listen(Listen::Off))
        .await
        .unwrap();
    let x = conformance::open_account(&store, "x", "x", 1).await;
    let raw = schema.raw_pool().await;
    let held = [pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];

    let work = async {
        // Loads, a commit, and the caller's commit.
        let mut tx = raw.begin().await.unwrap();
        let mut ctx = store.begin_in(&mut tx).unwrap();
        let mut account = ctx.load::<Account>(x).await.unwrap();
        ctx.apply(&mut account, Deposited { amount: 1 }).unwrap();
        let mut fresh = ctx.create::<Account>().unwrap();
        ctx.apply(&mut fresh, Opened { owner: "f".into() }).unwrap();
        ctx.commit().await.unwrap();
        tx.commit().await.unwrap();

        // A conflict, diagnosed over the connection: another unit moved X.
        let mut tx = raw.begin().await.unwrap();
        let mut ctx = store.begin_in(&mut tx).unwrap();
        let mut stale = ctx.load::<Account>(x).await.unwrap();
        ctx.apply(&mut stale, Deposited { amount: 1 }).unwrap();
        let mut tx2 = raw.begin().await.unwrap();
        deposit_bound(&store, &mut tx2, x).await.unwrap();
        tx2.commit().await.unwrap();
        assert!(matches!(ctx.commit().await, Err(Error::Conflict { .. })));

        // A key taken meanwhile, a lost load_or_create race, an id taken meanwhile.
        let lost: [(New, IsExpected); 3] = [
            (New::Key("late"), |e| matches!(e, Error::KeyTaken { .. })),
            (New::LoadOrCreate("signup"), |e| {
                matches!(e, Error::Conflict { .. })
            }),
            (New::Id(AggregateId::from(uuid::Uuid::now_v7())), |e| {
                matches!(e, Error::IdTaken { .. })
            }),
        ];
        for (how, expected) in lost {
            let mut ctx = store.begin_in(&mut tx).unwrap();
            stage_open(&mut ctx, how).await.unwrap();
            open_bound(&store, &raw, how).await;
            match ctx.commit().await {
                Err(e) if expected(&e) => {}
                other => panic!("{how:?}: got {other:?}"),
            }
        }
        tx.commit().await.unwrap();
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("the bound units never waited for the store's pool");
    drop(held);
    assert_eq!(conformance::versions(&store, x).await, [1, 2, 3, 4]);
    store.close().await;
    pool.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_in_needs_a_postgres_store_and_a_transaction() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let mut conn = raw.acquire().await.unwrap();
    let memory = Store::open("memory:").await.unwrap();
    assert!(matches!(memory.begin_in(&mut conn), Err(Error::Config(_))));

    // Outside a transaction: loads read, the commit is refused and writes nothing.
    let x = conformance::open_account(&store, "x", "x", 0).await;
    let mut ctx = store.begin_in(&mut conn).unwrap();
    let mut account = ctx.load::<Account>(x).await.unwrap();
    ctx.apply(&mut account, Deposited { amount: 1 }).unwrap();
    match ctx.commit().await {
        Err(Error::Config(message)) => assert!(message.contains("transaction"), "{message}"),
        other => panic!("expected Config, got {other:?}"),
    }
    assert_eq!(conformance::versions(&store, x).await, [1]);

    // A read-only store gives read-only bound contexts.
    let reader = schema.open_with(schema.options().read_only(true)).await;
    let mut tx = raw.begin().await.unwrap();
    let mut ctx = reader.begin_in(&mut tx).unwrap();
    assert!(ctx.is_read_only());
    let mut account = ctx.load::<Account>(x).await.unwrap();
    assert!(matches!(
        ctx.apply(&mut account, Deposited { amount: 1 }),
        Err(Error::ReadOnly)
    ));
    ctx.commit().await.unwrap();
    tx.rollback().await.unwrap();
    reader.close().await;
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_when_the_callers_transaction_commits() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    // Polls once a minute: only a notification wakes it in time.
    let waiting = schema
        .open_with(schema.options().poll_interval(Duration::from_secs(60)))
        .await;
    let store = schema.open().await;
    let x = conformance::open_account(&store, "x", "x", 0).await;
    let cursor = conformance::read_feed_to_end(&waiting, FeedCursor::START, 10)
        .await
        .last()
        .unwrap()
        .cursor;
    // The first wait starts the listener.
    assert!(
        !waiting
            .wait_for_events(cursor, Duration::from_millis(200))
            .await
            .unwrap()
    );
    let waiter = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            waiting
                .wait_for_events(cursor, Duration::from_secs(50))
                .await
        })
    };
    let raw = schema.raw_pool().await;
    let mut tx = raw.begin().await.unwrap();
    deposit_bound(&store, &mut tx, x).await.unwrap();
    tx.commit().await.unwrap();
    // 30 s is well before the 60 s poll.
    let woken = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("woken before the poll interval")
        .expect("no panic")
        .unwrap();
    assert!(woken);
    waiting.close().await;
    store.close().await;
}

/// One run of a unit of work with idempotency key `key`: an order row and a deposit to `id`, in
/// one transaction, through a bound context (`bound`) or `commit_in`. Commits the transaction
/// when the events were new, rolls it back when they were stored already; returns whether they
/// were.
async fn idempotent_unit(
    store: &Store,
    raw: &sqlx::PgPool,
    table: &str,
    id: AggregateId,
    key: uuid::Uuid,
    bound: bool,
) -> bool {
    let mut tx = raw.begin().await.unwrap();
    insert_order(&mut tx, table, &uuid::Uuid::now_v7().to_string()).await;
    let committed = if bound {
        let mut ctx = store.begin_in(&mut tx).unwrap();
        ctx.set_idempotency_key(key);
        let mut account = ctx.load::<Account>(id).await.unwrap();
        ctx.apply(&mut account, Deposited { amount: 10 }).unwrap();
        ctx.commit().await.unwrap()
    } else {
        let mut ctx = store.begin();
        ctx.set_idempotency_key(key);
        let mut account = ctx.load::<Account>(id).await.unwrap();
        ctx.apply(&mut account, Deposited { amount: 10 }).unwrap();
        ctx.commit_in(&mut tx).await.unwrap()
    };
    if committed.already_committed() {
        tx.rollback().await.unwrap();
    } else {
        tx.commit().await.unwrap();
    }
    committed.already_committed()
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_run_again_with_its_key_is_already_committed() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let table = schema.orders_table(&raw).await;
    let id = conformance::open_account(&store, "ida", "Ida", 0).await;
    for bound in [true, false] {
        let key = uuid::Uuid::now_v7();
        assert!(!idempotent_unit(&store, &raw, &table, id, key, bound).await);
        // The run again (after a lost answer, say) finds its events stored.
        assert!(idempotent_unit(&store, &raw, &table, id, key, bound).await);
    }
    let account = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((account.balance, account.version()), (20, 3));
    assert_eq!(
        order_numbers(&raw, &table).await.len(),
        2,
        "one order per unit"
    );
}
