//! The PostgreSQL store's connections: a load or commit hands its connection to the next one
//! (sqlx would check it with a round trip on the way back into its pool), without ever leaving
//! other work waiting for a connection, and closing or dropping the store gives every connection
//! back.

#![cfg(feature = "postgres")]

#[path = "support/postgres.rs"]
mod support;

use std::time::Duration;

use annals::prelude::*;
use annals::{Error, FeedCursor, Retry, StoreOptions};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

/// A bound on each test's waits: reached only if connections were never given back.
const LIMIT: Duration = Duration::from_secs(120);

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(name = "connections.added")]
struct Added {
    amount: i64,
}

#[derive(Aggregate, Serialize, Deserialize, Default, Debug, Clone)]
#[aggregate(name = "connections.counter", events(Added))]
struct Counter {
    total: i64,
}

impl Apply<Added> for Counter {
    fn apply(&mut self, e: &Added) {
        self.total += e.amount;
    }
}

async fn add(store: &Store, id: AggregateId, amount: i64) -> Result<(), Error> {
    store
        .transact_with_retry(Retry::attempts(50), async |ctx| {
            let mut counter = ctx.load::<Counter>(id).await?;
            ctx.apply(&mut counter, Added { amount })?;
            Ok(())
        })
        .await
}

async fn counters(store: &Store, n: usize) -> Vec<AggregateId> {
    store
        .transact(async |ctx| {
            let mut ids = Vec::new();
            for _ in 0..n {
                let mut counter = ctx.create::<Counter>()?;
                ctx.apply(&mut counter, Added { amount: 0 })?;
                ids.push(counter.id());
            }
            Ok::<_, Error>(ids)
        })
        .await
        .unwrap()
}

/// The server's sessions connected under `application_name`, polled until there are none (a
/// session ends a moment after its client closes the socket); returns how many are left.
async fn sessions_left(raw: &sqlx::PgPool, application_name: &str) -> i64 {
    let mut left = 0;
    for _ in 0..100 {
        left =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(application_name)
                .fetch_one(raw)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    left
}

fn connect_options(schema: &support::Schema, application_name: &str) -> PgConnectOptions {
    let connect: PgConnectOptions = schema.url.parse().unwrap();
    connect.application_name(application_name)
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_and_commits_share_a_small_pool_with_other_work() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    // Two connections: one may stay parked between statements, the other serves the rest.
    let store = schema.open_with(schema.options().pool_size(2)).await;
    let ids = counters(&store, 6).await;
    let shared = ids[0];

    let mut tasks = Vec::new();
    // Six writers of their own counters, and three more on the first one: conflicts, whose
    // statements complete and whose diagnosis needs another connection.
    for (i, &id) in ids
        .iter()
        .chain([shared, shared, shared].iter())
        .enumerate()
    {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                add(&store, id, 1 + i as i64 % 2).await.unwrap();
            }
        }));
    }
    // Readers of the feed and of histories, and commits of two aggregates at once, meanwhile.
    {
        let (store, ids) = (store.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut cursor = FeedCursor::default();
            for round in 0..25 {
                let page = store.read_feed(cursor, 50).await.unwrap();
                cursor = page.cursor_or(cursor);
                store.history(ids[round % ids.len()]).await.unwrap();
            }
        }));
    }
    {
        let (store, ids) = (store.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                let (a, b) = (ids[1 + round % 5], ids[1 + (round + 1) % 5]);
                store
                    .transact_with_retry(Retry::attempts(50), async |ctx| {
                        let mut first = ctx.load::<Counter>(a).await?;
                        let mut second = ctx.load::<Counter>(b).await?;
                        ctx.apply(&mut first, Added { amount: 100 })?;
                        ctx.apply(&mut second, Added { amount: 100 })?;
                        Ok::<_, Error>(())
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    tokio::time::timeout(LIMIT, futures_util::future::try_join_all(tasks))
        .await
        .expect("no statement waits for a parked connection")
        .expect("no task panicked");

    let mut reader = store.begin_read_only();
    let mut total = 0;
    let mut version = 0;
    for &id in &ids {
        let counter = reader.load::<Counter>(id).await.unwrap();
        total += counter.total;
        version += counter.version();
    }
    // 25 adds of 1 or 2 by each of nine writers (by index: 1, 2, 1, 2, ...), 20 of 100.
    let adds: i64 = (0..9).map(|i| 25 * (1 + i % 2)).sum();
    assert_eq!(total, adds + 20 * 100);
    assert_eq!(version, 6 + 9 * 25 + 20);
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_store_gives_every_connection_back() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let name = format!("annals-close-{}", uuid::Uuid::now_v7().simple());
    let options = StoreOptions::new().schema(&schema.name).pool_size(4);
    let store = Store::open_postgres(connect_options(&schema, &name), options)
        .await
        .unwrap();
    let ids = counters(&store, 4).await;
    let writers: Vec<_> = ids
        .iter()
        .map(|&id| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    add(&store, id, 1).await.unwrap();
                }
            })
        })
        .collect();
    futures_util::future::try_join_all(writers).await.unwrap();

    let raw = schema.raw_pool().await;
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&name)
            .fetch_one(&raw)
            .await
            .unwrap();
    assert!(open > 0, "the store's sessions are open");
    tokio::time::timeout(LIMIT, store.close())
        .await
        .expect("closing does not wait for parked connections");
    assert_eq!(sessions_left(&raw, &name).await, 0);
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[test]
fn a_store_dropped_after_its_runtime_closes_its_connections() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let name = format!("annals-drop-{}", uuid::Uuid::now_v7().simple());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(async {
        let options = StoreOptions::new().schema(&schema.name).pool_size(4);
        let store = Store::open_postgres(connect_options(&schema, &name), options)
            .await
            .unwrap();
        let ids = counters(&store, 2).await;
        for &id in &ids {
            add(&store, id, 1).await.unwrap();
        }
        store
    });
    // The store outlives the runtime its connections were made on; dropping it must not
    // panic, and its sessions end.
    drop(runtime);
    drop(store);

    let check = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    check.block_on(async {
        let raw = schema.raw_pool().await;
        assert_eq!(sessions_left(&raw, &name).await, 0);
    });
}
