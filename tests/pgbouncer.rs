//! annals behind pgbouncer in transaction mode (`.ci/pgbouncer` installs the binaries): a
//! pgbouncer that keeps prepared statements (1.21 or newer) works, with `LISTEN` at the server
//! or polling, and with more units of work in the caller's transactions than it has server
//! connections, and runs a partitioned subscription's workers (leases are rows, not session
//! locks); one that does not (Debian's 1.18) is refused at open with an error that says what to
//! do.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/pgbouncer.rs"]
mod pgbouncer;
#[path = "support/postgres.rs"]
mod support;

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use annals::prelude::*;
use annals::{Error, Listen};
use conformance::domain;
use conformance::domain::*;
use pgbouncer::Pgbouncer;

const LIMIT: Duration = Duration::from_secs(120);

/// A fresh schema and a pgbouncer 1.21+ in transaction mode with 4 server connections that
/// keeps prepared statements; `None` when either is not configured.
fn bouncer() -> Option<(support::Schema, Pgbouncer)> {
    let schema = support::fresh_schema()?;
    let binary = pgbouncer::binary("ANNALS_PGBOUNCER")?;
    let bouncer = Pgbouncer::start(&binary, &schema.url, 4, "max_prepared_statements = 100");
    Some((schema, bouncer))
}

async fn transfer(store: &Store, from: AggregateId, to: AggregateId) -> Result<(), Error> {
    store
        .transact_with_retry(Retry::attempts(10_000), async move |ctx| {
            let mut a = ctx.load::<Account>(from).await?;
            let mut b = ctx.load::<Account>(to).await?;
            ctx.apply(&mut a, Withdrawn { amount: 1 })?;
            ctx.apply(&mut b, Deposited { amount: 1 })?;
            Ok::<_, Error>(())
        })
        .await
}

#[cfg_attr(
    any(annals_skip_postgres, annals_skip_pgbouncer),
    ignore = "DATABASE_URL or ANNALS_PGBOUNCER is not set"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contended_commits_and_the_feed_through_pgbouncer() {
    const TASKS: usize = 8;
    const TRANSFERS: usize = 25;
    let Some((schema, bouncer)) = bouncer() else {
        return;
    };
    // More client connections than pgbouncer has server connections; no LISTEN through it.
    let options = schema.options().pool_size(8).listen(Listen::Off);
    let store = Store::open_with(&bouncer.url, options).await.unwrap();
    let mut accounts = Vec::new();
    for i in 0..4 {
        accounts.push(conformance::open_account(&store, &format!("a{i}"), "owner", 100).await);
    }
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            let accounts = accounts.clone();
            tokio::spawn(async move {
                for i in 0..TRANSFERS {
                    let from = accounts[(t + i) % 4];
                    let to = accounts[(t + i + 1) % 4];
                    transfer(&store, from, to).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(LIMIT, task)
            .await
            .expect("finished in time")
            .expect("no panic")
            .expect("every transfer committed");
    }
    let mut total = 0;
    let mut versions = 0;
    for id in &accounts {
        let account = store.begin_read_only().load::<Account>(*id).await.unwrap();
        total += account.balance;
        versions += account.version();
    }
    assert_eq!(total, 400);
    assert_eq!(versions, 4 * 2 + 2 * (TASKS * TRANSFERS) as u64);

    // The feed gives every event once.
    let feed = conformance::read_feed_to_end(&store, FeedCursor::START, 64).await;
    assert_eq!(feed.len() as u64, versions);
    let unique: HashSet<_> = feed.iter().map(|e| e.event_id).collect();
    assert_eq!(unique.len(), feed.len());
    store.close().await;
}

#[cfg_attr(
    any(annals_skip_postgres, annals_skip_pgbouncer),
    ignore = "DATABASE_URL or ANNALS_PGBOUNCER is not set"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_wake_through_a_listen_at_the_server_or_by_polling() {
    let Some((schema, bouncer)) = bouncer() else {
        return;
    };
    let writer = Store::open_with(&bouncer.url, schema.options().listen(Listen::Off))
        .await
        .unwrap();
    // One waiter listens at the server itself, and would poll only once a minute; the other
    // does not listen and polls every 50 ms.
    let listening = Store::open_with(
        &bouncer.url,
        schema
            .options()
            .listen(Listen::Url(schema.url.clone()))
            .poll_interval(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let polling = Store::open_with(
        &bouncer.url,
        schema
            .options()
            .listen(Listen::Off)
            .poll_interval(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let id = conformance::open_account(&writer, "w", "w", 0).await;
    let cursor = conformance::read_feed_to_end(&writer, FeedCursor::START, 10)
        .await
        .last()
        .unwrap()
        .cursor;
    // The listener is started by a first wait.
    assert!(
        !listening
            .wait_for_events(cursor, Duration::from_millis(200))
            .await
            .unwrap()
    );
    let waiters: Vec<_> = [listening.clone(), polling.clone()]
        .into_iter()
        .map(|store| {
            tokio::spawn(
                async move { store.wait_for_events(cursor, Duration::from_secs(50)).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount: 1 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    for waiter in waiters {
        // Well before the listening waiter's one-minute poll: only its notification, or the
        // other's polling, ends the wait in time.
        let woken = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("woken in time")
            .expect("no panic")
            .unwrap();
        assert!(woken);
    }
    for store in [writer, listening, polling] {
        store.close().await;
    }
}

/// One unit of work in the caller's transaction through the pooler: the unit's own row and a
/// deposit to `account` from a context bound to the transaction, re-run in a new transaction
/// on a conflict (the test's time limit bounds the retries). Returns the deposit's event id,
/// which the row holds too.
async fn deposit_with_row(
    store: &Store,
    app: &sqlx::PgPool,
    table: &str,
    number: &str,
    account: AggregateId,
) -> Result<uuid::Uuid, Error> {
    loop {
        let mut tx = app.begin().await.unwrap();
        let mut ctx = store.begin_in(&mut tx)?;
        let mut a = ctx.load::<Account>(account).await?;
        let event_id = ctx.apply(&mut a, Deposited { amount: 1 })?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} (number, event_id) VALUES ($1, $2)"
        )))
        .bind(number)
        .bind(event_id)
        .execute(ctx.connection())
        .await
        .unwrap();
        match ctx.commit().await {
            Ok(_) => {
                tx.commit().await.unwrap();
                return Ok(event_id);
            }
            Err(e) if e.is_conflict() => tx.rollback().await.unwrap(),
            Err(e) => return Err(e),
        }
    }
}

#[cfg_attr(
    any(annals_skip_postgres, annals_skip_pgbouncer),
    ignore = "DATABASE_URL or ANNALS_PGBOUNCER is not set"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_bound_units_than_server_connections_through_pgbouncer() {
    const UNITS: usize = 8;
    const ITERATIONS: usize = 25;
    let Some((schema, bouncer)) = bouncer() else {
        return;
    };
    let store = Store::open_with(&bouncer.url, schema.options().listen(Listen::Off))
        .await
        .unwrap();
    // The application's own pool through the pooler: twice as many clients as pgbouncer has
    // server connections (4), each unit holding one transaction at a time.
    let connect = sqlx::postgres::PgConnectOptions::from_str(&bouncer.url)
        .unwrap()
        .extra_float_digits(None);
    let app = sqlx::postgres::PgPoolOptions::new()
        .max_connections(UNITS as u32)
        .connect_with(connect)
        .await
        .unwrap();
    let table = format!("{}.orders", schema.name);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (number text PRIMARY KEY, event_id uuid NOT NULL UNIQUE)"
    )))
    .execute(&app)
    .await
    .unwrap();
    let mut accounts = Vec::new();
    for i in 0..4 {
        accounts.push(conformance::open_account(&store, &format!("a{i}"), "owner", 0).await);
    }
    let tasks: Vec<_> = (0..UNITS)
        .map(|u| {
            let (store, app, table, accounts) =
                (store.clone(), app.clone(), table.clone(), accounts.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..ITERATIONS {
                    let account = accounts[(u + i) % accounts.len()];
                    let number = format!("{u}-{i}");
                    ids.push(deposit_with_row(&store, &app, &table, &number, account).await?);
                }
                Ok::<_, Error>(ids)
            })
        })
        .collect();
    let mut committed = HashSet::new();
    for task in tasks {
        let ids = tokio::time::timeout(LIMIT, task)
            .await
            .expect("finished in time")
            .expect("no panic")
            .expect("every unit committed");
        committed.extend(ids);
    }
    assert_eq!(committed.len(), UNITS * ITERATIONS);

    // Every committed unit left its row and its event, and nothing else did.
    let rows: Vec<uuid::Uuid> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT event_id FROM {table}")))
            .fetch_all(&app)
            .await
            .unwrap();
    assert_eq!(rows.len(), UNITS * ITERATIONS);
    assert_eq!(rows.into_iter().collect::<HashSet<_>>(), committed);
    let feed = conformance::read_feed_to_end(&store, FeedCursor::START, 64).await;
    let deposits: HashSet<uuid::Uuid> = feed
        .iter()
        .filter(|e| e.event_type == "account.deposited")
        .map(|e| e.event_id)
        .collect();
    assert_eq!(feed.len(), 4 + UNITS * ITERATIONS);
    assert_eq!(deposits, committed);
    let mut total = 0;
    for id in &accounts {
        total += store
            .begin_read_only()
            .load::<Account>(*id)
            .await
            .unwrap()
            .balance;
    }
    assert_eq!(total, (UNITS * ITERATIONS) as i64);
    app.close().await;
    store.close().await;
}

#[cfg_attr(
    any(annals_skip_postgres, annals_skip_pgbouncer_old),
    ignore = "DATABASE_URL or ANNALS_PGBOUNCER_OLD is not set"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_that_loses_prepared_statements_is_refused_at_open() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let Some(binary) = pgbouncer::binary("ANNALS_PGBOUNCER_OLD") else {
        return;
    };
    // Debian's 1.18 in transaction mode, defaults otherwise: it accepts the connection (annals
    // sends no startup parameter it refuses) but cannot keep prepared statements.
    let bouncer = Pgbouncer::start(&binary, &schema.url, 1, "");
    match Store::open_with(&bouncer.url, schema.options()).await {
        Err(Error::Config(message)) => {
            assert!(message.contains("max_prepared_statements"), "{message}");
            assert!(message.contains("session mode"), "{message}");
        }
        other => panic!("expected Config, got {other:?}"),
    }
    // Nothing was written: the refusal came before the migrations.
    let exists = schema.exists().await;
    assert!(!exists);
}

/// Two workers of a partitioned subscription through the pooler, with polling: the read model
/// in the store's schema holds each deposit once, and its sums are the writers'.
#[cfg_attr(
    any(annals_skip_postgres, annals_skip_pgbouncer),
    ignore = "DATABASE_URL or ANNALS_PGBOUNCER is not set"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscription_workers_through_pgbouncer() {
    let Some((schema, bouncer)) = bouncer() else {
        return;
    };
    let store = Store::open_with(&bouncer.url, schema.options().listen(Listen::Off))
        .await
        .unwrap();
    let mut ledger = ledger::Ledger {
        tables: format!("\"{}\".model", schema.name),
        delay: Duration::ZERO,
    };
    ledger::soak_subscription(&store)
        .reset(&mut ledger)
        .await
        .unwrap();
    let mut accounts = Vec::new();
    for i in 0..8 {
        accounts.push(conformance::open_account(&store, &format!("b{i}"), "owner", 0).await);
    }
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (store, mut handler) = (store.clone(), ledger.clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let worker = ledger::soak_subscription(&store);
                worker
                    .run(&mut handler, async {
                        let _ = stopped.await;
                    })
                    .await
            });
            (stop, task)
        })
        .collect();
    let mut expected: std::collections::HashMap<String, i64> = Default::default();
    for round in 1..=10 {
        for &id in &accounts {
            store
                .transact_with_retry(Retry::attempts(100), async |ctx| {
                    let mut a = ctx.load::<Account>(id).await?;
                    ctx.apply(&mut a, Deposited { amount: round })?;
                    Ok::<_, Error>(())
                })
                .await
                .unwrap();
            *expected.entry(id.to_string()).or_default() += round;
        }
    }
    conformance::until_caught_up(&store, "soak", "the workers catch up").await;
    for (stop, task) in workers {
        stop.send(()).unwrap();
        tokio::time::timeout(LIMIT, task)
            .await
            .expect("stopped in time")
            .unwrap()
            .unwrap();
    }
    let direct = schema.raw_pool().await;
    let effects: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}_effects",
        ledger.tables
    )))
    .fetch_one(&direct)
    .await
    .unwrap();
    assert_eq!(effects, 80, "each deposit once");
    let sums: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT account, total FROM {}_sums",
        ledger.tables
    )))
    .fetch_all(&direct)
    .await
    .unwrap();
    assert_eq!(
        sums.into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
        expected
    );
    store.close().await;
}
