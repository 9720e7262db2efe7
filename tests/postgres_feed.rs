//! The PostgreSQL global feed under late commits, rollbacks and concurrent writers: every
//! committed event once, each aggregate's events in version order, nothing skipped.
//!
//! Apart from the conformance suite: these tests hold transactions open, which holds back the
//! feed of every other test running on the same server at that moment.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/postgres.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use annals::Error;
use annals::prelude::*;
use conformance::domain::*;

const LIMIT: Duration = Duration::from_secs(120);

/// An account opened for an owner of its key's name, with no deposit.
async fn open_account(store: &Store, key: &str) -> AggregateId {
    conformance::open_account(store, key, key, 0).await
}

async fn deposit(store: &Store, id: AggregateId, amount: i64) -> uuid::Uuid {
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount })
        })
        .await
        .expect("deposit")
}

/// Reads the feed after `cursor` until it is caught up and nothing holds it back.
async fn read_all(store: &Store, cursor: FeedCursor, page: usize) -> Vec<RecordedEvent> {
    conformance::read_feed_to_end(store, cursor, page).await
}

/// Reads on from `cursor` until `count` events came, failing instead of hanging.
async fn read_count(store: &Store, cursor: FeedCursor, count: usize) -> Vec<RecordedEvent> {
    let work = async {
        let mut read: Vec<RecordedEvent> = Vec::new();
        let mut cursor = cursor;
        while read.len() < count {
            let events = store.read_feed(cursor, 100).await.expect("read feed");
            cursor = events.cursor_or(cursor);
            if events.len() < 100 && read.len() + events.len() < count {
                // Caught up, or held back by a transaction still open: read again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            read.extend(events);
        }
        read
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("the feed delivered the events in time")
}

fn ids(events: &[RecordedEvent]) -> Vec<uuid::Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_is_not_skipped() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let x = open_account(&store, "x").await;
    let y = open_account(&store, "y").await;
    let start = read_count(&store, FeedCursor::START, 2).await;
    let cursor = start.last().unwrap().cursor;

    // A: a context committed inside a transaction that stays open.
    let mut tx_a = raw.begin().await.unwrap();
    let mut ctx = store.begin();
    let mut account = ctx.load::<Account>(x).await.unwrap();
    let a_event = ctx.apply(&mut account, Deposited { amount: 1 }).unwrap();
    ctx.commit_in(&mut tx_a).await.unwrap();
    let (a_pid, a_xid, database): (i32, i64, String) = sqlx::query_as(
        "SELECT pg_backend_pid(), pg_current_xact_id()::text::int8, current_database()::text",
    )
    .fetch_one(&mut *tx_a)
    .await
    .unwrap();

    // B commits while A is open: it is committed and visible, with a higher position...
    let b_event = deposit(&store, y, 2).await;
    let history = store.history(y).await.unwrap();
    assert_eq!(history.last().map(|e| e.event_id), Some(b_event));
    let b_cursor = history.last().unwrap().cursor;
    // ...but a feed reader does not move past A, and says A holds it back (A, or a transaction
    // of another test of this database that began before A).
    for _ in 0..3 {
        let page = store.read_feed(cursor, 10).await.unwrap();
        assert!(
            page.is_empty(),
            "the feed must not pass a transaction that is still open"
        );
        let held = page.held_back.expect("a page held back says so");
        assert!(held.xid <= a_xid as u64, "{held}");
        assert_eq!(held.newest_waiting, b_cursor);
        if held.xid == a_xid as u64 {
            assert_eq!(held.pid, Some(a_pid));
            assert_eq!(held.database.as_deref(), Some(database.as_str()));
            assert!(!held.prepared);
            assert!(held.age.is_some());
            assert!(held.to_string().contains(&format!("pid {a_pid}")), "{held}");
        }
    }
    // A waiter is not woken by events held back: it times out with nothing to read.
    assert!(
        !store
            .wait_for_events(cursor, Duration::from_millis(50))
            .await
            .unwrap()
    );

    tx_a.commit().await.unwrap();
    let read = read_count(&store, cursor, 2).await;
    assert_eq!(ids(&read), [a_event, b_event], "A then B, each once");
    assert!(
        read[0].position() < read[1].position(),
        "A's event has the lower position: a reader of `position > last` would have skipped it"
    );
    assert!(read[0].cursor < read[1].cursor);
    assert!(read_all(&store, read[1].cursor, 10).await.is_empty());
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transactions_leave_no_stall() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let x = open_account(&store, "x").await;
    let y = open_account(&store, "y").await;
    let cursor = read_count(&store, FeedCursor::START, 2)
        .await
        .last()
        .unwrap()
        .cursor;

    let mut tx_a = raw.begin().await.unwrap();
    let mut ctx = store.begin();
    let mut account = ctx.load::<Account>(x).await.unwrap();
    ctx.apply(&mut account, Deposited { amount: 1 }).unwrap();
    let mut fresh = ctx.create_with_key::<Account>("z").await.unwrap();
    ctx.apply(&mut fresh, Opened { owner: "z".into() }).unwrap();
    ctx.commit_in(&mut tx_a).await.unwrap();
    let b_event = deposit(&store, y, 2).await;
    tx_a.rollback().await.unwrap();

    // Failed commits of other kinds end their transactions too.
    let mut stale = store.begin();
    let mut old = stale.load::<Account>(y).await.unwrap();
    stale.apply(&mut old, Deposited { amount: 3 }).unwrap();
    let c_event = deposit(&store, y, 4).await;
    assert!(matches!(stale.commit().await, Err(Error::Conflict { .. })));
    let mut ctx = store.begin();
    // `create_with_key`: a clash on a key from `load_or_create_by_key` is a Conflict instead.
    let mut clash = ctx.create_with_key::<Account>("k").await.unwrap();
    ctx.apply(&mut clash, Opened { owner: "k1".into() })
        .unwrap();
    let k_event = open_account(&store, "k").await;
    assert!(matches!(ctx.commit().await, Err(Error::KeyTaken { .. })));

    let read = read_count(&store, cursor, 3).await;
    let k_first = store.history(k_event).await.unwrap()[0].event_id;
    assert_eq!(ids(&read), [b_event, c_event, k_first]);
    assert!(read_all(&store, read[2].cursor, 10).await.is_empty());
    assert!(
        store
            .begin_read_only()
            .find_by_key::<Account>("z")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.history(x).await.unwrap().len(), 1);
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_keep_each_aggregate_in_order() {
    const WRITERS: usize = 8;
    const AGGREGATES: usize = 4;
    const COMMITS: usize = 5_000;
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let store = schema.open_with(schema.options().pool_size(10)).await;
    let mut counters = Vec::new();
    for _ in 0..AGGREGATES {
        counters.push(
            store
                .transact(async |ctx| {
                    let mut c = ctx.create::<Counter>()?;
                    ctx.apply(&mut c, CounterEvent::Reset(0))?;
                    Ok::<_, Error>(c.id())
                })
                .await
                .unwrap(),
        );
    }
    let total = AGGREGATES + COMMITS;

    // A reader pages through the feed while the writers run.
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { read_count(&store, FeedCursor::START, total).await })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                for i in (w..COMMITS).step_by(WRITERS) {
                    let id = counters[i % AGGREGATES];
                    store
                        .transact_with_retry(Retry::attempts(10_000), async move |ctx| {
                            let mut c = ctx.load::<Counter>(id).await?;
                            ctx.apply(&mut c, CounterEvent::Incremented)?;
                            Ok::<_, Error>(())
                        })
                        .await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for writer in writers {
        tokio::time::timeout(Duration::from_secs(600), writer)
            .await
            .expect("writer finished in time")
            .expect("writer did not panic")
            .expect("no error reached the writer");
    }
    let concurrent = tokio::time::timeout(LIMIT, reader)
        .await
        .expect("reader finished in time")
        .expect("reader did not panic");
    let after = read_count(&store, FeedCursor::START, total).await;

    for read in [&concurrent, &after] {
        assert_eq!(read.len(), total);
        let mut seen = HashSet::new();
        assert!(
            read.iter().all(|e| seen.insert(e.event_id)),
            "each event once"
        );
        let mut last: HashMap<AggregateId, u64> = HashMap::new();
        for e in read.iter() {
            let prev = last.insert(e.aggregate_id, e.version).unwrap_or(0);
            assert_eq!(
                e.version,
                prev + 1,
                "each aggregate's events in version order"
            );
        }
        assert!(read.windows(2).all(|w| w[0].cursor < w[1].cursor));
        let versions: u64 = last.values().sum();
        assert_eq!(versions, total as u64);
    }
    assert_eq!(
        ids(&concurrent),
        ids(&after),
        "the reader saw the final order"
    );
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_transaction_older_than_its_load_keeps_version_order() {
    older_transaction_keeps_version_order(false).await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_context_in_an_older_transaction_keeps_version_order() {
    older_transaction_keeps_version_order(true).await;
}

/// A caller's transaction that took its id before a commit its context then loads: the
/// context's events still follow that commit in the feed, whether it loaded through the pool
/// (`commit_in`) or over the transaction (`bound`, a context from `begin_in`).
async fn older_transaction_keeps_version_order(bound: bool) {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let x = open_account(&store, "x").await;
    let cursor = read_count(&store, FeedCursor::START, 1)
        .await
        .last()
        .unwrap()
        .cursor;

    // The caller's transaction writes first: its transaction id is the older one...
    let mut tx = raw.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {}.audit (note text)",
        schema.name
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    // ...then another commit extends X, and only then does the caller's context load X.
    let other = deposit(&store, x, 1).await;
    let mine = if bound {
        let mut ctx = store.begin_in(&mut tx).unwrap();
        let mut account = ctx.load::<Account>(x).await.unwrap();
        assert_eq!(account.version(), 2);
        let mine = ctx.apply(&mut account, Deposited { amount: 2 }).unwrap();
        ctx.commit().await.unwrap();
        mine
    } else {
        let mut ctx = store.begin();
        let mut account = ctx.load::<Account>(x).await.unwrap();
        assert_eq!(account.version(), 2);
        let mine = ctx.apply(&mut account, Deposited { amount: 2 }).unwrap();
        ctx.commit_in(&mut tx).await.unwrap();
        mine
    };
    tx.commit().await.unwrap();

    let read = read_count(&store, cursor, 2).await;
    assert_eq!(ids(&read), [other, mine], "X's events in version order");
    assert_eq!(read.iter().map(|e| e.version).collect::<Vec<_>>(), [2, 3]);
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_another_database_does_not_hold_the_feed_back() {
    let Some((store, _schema)) = support::open_fresh().await else {
        return;
    };
    let url = support::database_url().expect("a server");
    // A write transaction left open in another database of the same server: it has an id, and
    // it is older than every event committed below.
    let other = support::Database::create(&url).await;
    let raw = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&other.url)
        .await
        .unwrap();
    let mut foreign = raw.begin().await.unwrap();
    let foreign_xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::int8")
        .fetch_one(&mut *foreign)
        .await
        .unwrap();

    // The feed checks of the conformance suite, exact, with that transaction open.
    conformance::feed_each_event_once_in_commit_order(&store).await;
    let x = open_account(&store, "x").await;
    let event = deposit(&store, x, 5).await;
    let read = read_all(&store, FeedCursor::START, 100).await;
    assert_eq!(read.len(), 3 + 15 + 2);
    assert_eq!(read.last().map(|e| e.event_id), Some(event));
    let page = store
        .read_feed(read.last().unwrap().cursor, 10)
        .await
        .unwrap();
    if let Some(held) = &page.held_back {
        assert_ne!(held.xid, foreign_xid as u64, "{held}");
    }

    foreign.rollback().await.unwrap();
    raw.close().await;
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contexts_events_follow_every_event_it_loaded() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    // The caller's transaction writes its own table first: its transaction id is the older.
    let mut tx = raw.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {}.invoices (number text)",
        schema.name
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    // A customer is committed elsewhere, after that.
    let customer = open_account(&store, "customer").await;
    let customer_event = store.history(customer).await.unwrap()[0].event_id;
    // The context only reads the customer, and creates an order from it in the caller's
    // transaction.
    let mut ctx = store.begin();
    let read = ctx.load::<Account>(customer).await.unwrap();
    let mut order = ctx.create_with_key::<Account>("order-1").await.unwrap();
    let order_event = ctx
        .apply(
            &mut order,
            Opened {
                owner: read.owner.clone(),
            },
        )
        .unwrap();
    ctx.commit_in(&mut tx).await.unwrap();
    tx.commit().await.unwrap();

    let feed = read_all(&store, FeedCursor::START, 100).await;
    assert_eq!(
        ids(&feed),
        [customer_event, order_event],
        "the order comes after the customer it was decided from"
    );
    store.close().await;
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_cluster_behind_hides_and_reorders_nothing() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let x = open_account(&store, "x").await;
    let y = open_account(&store, "y").await;
    deposit(&store, x, 1).await;
    deposit(&store, y, 2).await;
    let before = read_all(&store, FeedCursor::START, 100).await;
    assert_eq!(before.len(), 4);

    // The store moves to a cluster whose transaction counter is 10^8 behind the stored ids, as
    // after a restore or a logical-replication switch-over to a younger cluster: another
    // server, started at another time than the one that last checked the epoch.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET tx_id = (tx_id::text::int8 + 100000000)::text::xid8; \
         UPDATE {} SET server_started = server_started - INTERVAL '1 day';",
        schema.table("events"),
        schema.table("feed_epoch")
    )))
    .execute(&raw)
    .await
    .unwrap();

    // Every old event is still read, in the same order, with cursors as the old cluster gave.
    let moved = read_all(&store, FeedCursor::START, 100).await;
    assert_eq!(ids(&moved), ids(&before));
    let saved = moved[3].cursor;
    assert!(saved.tx > 100_000_000, "{saved:?}");
    // A cursor saved in the middle reads on exactly.
    assert_eq!(
        ids(&read_all(&store, moved[1].cursor, 100).await),
        ids(&moved[2..])
    );

    // New commits sort after every old event: a reader at the saved cursor sees them.
    let first = deposit(&store, x, 3).await;
    let second = deposit(&store, y, 4).await;
    let after = read_all(&store, saved, 100).await;
    assert_eq!(ids(&after), [first, second]);
    assert_eq!(
        after[0].cursor.epoch,
        saved.epoch + 1,
        "{:?}",
        after[0].cursor
    );
    let everything = read_all(&store, FeedCursor::START, 100).await;
    assert_eq!(everything.len(), 6);
    assert!(everything.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(conformance::versions(&store, x).await, [1, 2, 3]);

    // A cursor whose event was lost (a failover that lost the last transactions) is refused,
    // never read past in silence.
    let lost = FeedCursor {
        position: saved.position + 1_000,
        ..saved
    };
    match store.read_feed(lost, 10).await {
        Err(Error::CursorNotFound { cursor }) => assert_eq!(cursor, lost),
        other => panic!("expected CursorNotFound, got {other:?}"),
    }
    store.close().await;
}

/// Whether the feed epoch was checked by this server, and the epoch.
async fn epoch_state(raw: &sqlx::PgPool, schema: &support::Schema) -> (bool, i32) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT server_started = pg_postmaster_start_time(), epoch FROM {} WHERE id = 1",
        schema.table("feed_epoch")
    )))
    .fetch_one(raw)
    .await
    .unwrap()
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_commit_after_a_server_start_checks_the_epoch() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let x = open_account(&store, "x").await;
    let (checked, epoch) = epoch_state(&raw, &schema).await;
    assert!(checked, "opening checks the epoch");
    // As after a restart of the server: the one that last checked the epoch is another.
    let restart = format!(
        "UPDATE {} SET server_started = server_started - INTERVAL '1 day'",
        schema.table("feed_epoch")
    );
    let restarted = async || {
        sqlx::raw_sql(sqlx::AssertSqlSafe(restart.clone()))
            .execute(&raw)
            .await
            .unwrap();
        assert_eq!(epoch_state(&raw, &schema).await, (false, epoch));
    };

    // A commit on the pool finds the epoch unchecked, checks it, and commits.
    restarted().await;
    deposit(&store, x, 1).await;
    assert_eq!(epoch_state(&raw, &schema).await, (true, epoch));

    // So does a commit in a transaction of the store's own (a key change).
    restarted().await;
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(x).await?;
            ctx.change_key(&mut a, "x2")?;
            ctx.apply(&mut a, Deposited { amount: 2 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(epoch_state(&raw, &schema).await, (true, epoch));

    // And one in a caller's transaction, which checks inside its statement.
    restarted().await;
    let mut tx = raw.begin().await.unwrap();
    let mut ctx = store.begin();
    let mut a = ctx.load::<Account>(x).await.unwrap();
    ctx.apply(&mut a, Deposited { amount: 3 }).unwrap();
    ctx.commit_in(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(epoch_state(&raw, &schema).await, (true, epoch));

    // Nothing was lost or written twice, and the feed lists every event once, in order.
    assert_eq!(conformance::versions(&store, x).await, [1, 2, 3, 4]);
    let feed = read_all(&store, FeedCursor::START, 100).await;
    assert_eq!(feed.len(), 4);
    assert!(feed.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert!(
        feed.iter()
            .all(|e| i64::from(e.cursor.epoch) == i64::from(epoch))
    );
    store.close().await;
}

/// The warnings logged in this test binary: (schema field, message).
type Warnings = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// Collects every warning of the process, installed once as the global subscriber (a
/// thread-local one misses events whose callsite another test's thread registered first).
struct WarningLog(Warnings);

impl tracing::Subscriber for WarningLog {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        #[derive(Default)]
        struct Fields {
            schema: String,
            message: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.message = format!("{value:?}"),
                    "schema" => self.schema = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Ok(mut log) = self.0.lock() {
            log.push((fields.schema, fields.message));
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn warnings() -> Warnings {
    static LOG: std::sync::OnceLock<Warnings> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = Warnings::default();
        tracing::subscriber::set_global_default(WarningLog(log.clone()))
            .expect("the only global subscriber of this binary");
        log
    })
    .clone()
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_hold_back_is_logged_once_a_minute() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let log = warnings();
    let store = schema
        .open_with(schema.options().hold_back_warning(Duration::ZERO))
        .await;
    let raw = schema.raw_pool().await;
    let x = open_account(&store, "x").await;
    let cursor = read_all(&store, FeedCursor::START, 10).await[0].cursor;
    let mut holder = raw.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::int8")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    deposit(&store, x, 1).await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let page = store.read_feed(cursor, 10).await.unwrap();
        assert!(page.is_empty());
        seen.push(page.held_back.expect("held back").to_string());
    }
    let ours: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, m)| *s == schema.name && m.contains("the feed is held back by"))
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?} after {seen:?}");

    holder.rollback().await.unwrap();
    assert_eq!(read_all(&store, cursor, 10).await.len(), 1);
    store.close().await;
}

/// A filtered reader and a live stream around a late commit: neither moves its cursor past the
/// transaction still open, so the late event is read, once, when it commits.
#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_reader_does_not_skip_a_late_commit() {
    use futures_util::StreamExt;
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let raw = schema.raw_pool().await;
    let x = open_account(&store, "x").await;
    let y = open_account(&store, "y").await;
    let filter = annals::Filter::all().event::<Deposited>();
    let (before, start) =
        conformance::read_matching_to_end(&store, FeedCursor::START, 10, &filter).await;
    assert!(before.is_empty(), "no deposits yet");
    let mut follow = store.follow(start, filter.clone());
    let subscription = store
        .subscription("late")
        .filter(filter.clone())
        .start(annals::subscription::Start::After(start))
        .poll_interval(Duration::from_millis(10));
    subscription.open().await.unwrap();
    let seen = Seen::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let (subscription, mut seen) = (subscription.clone(), seen.clone());
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            subscription.run(&mut seen, shutdown).await
        })
    };

    // A deposit committed inside a transaction that stays open, then one that commits at once.
    let mut tx_a = raw.begin().await.unwrap();
    let mut ctx = store.begin();
    let mut account = ctx.load::<Account>(x).await.unwrap();
    let a_event = ctx.apply(&mut account, Deposited { amount: 1 }).unwrap();
    ctx.commit_in(&mut tx_a).await.unwrap();
    let b_event = deposit(&store, y, 2).await;
    // B is committed and matches, but the filtered read neither returns it nor moves past A.
    for _ in 0..3 {
        let page = store.read_feed_matching(start, 10, &filter).await.unwrap();
        assert!(
            page.is_empty(),
            "the filtered feed must not pass an open transaction"
        );
        assert!(page.held_back.is_some(), "a page held back says so");
        assert_eq!(
            page.scanned, start,
            "the cursor stays before the open transaction"
        );
    }
    // A running subscription delivers B neither, and keeps its cursor before A.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seen.ids().is_empty(),
        "the subscription must not pass an open transaction"
    );
    let status = &store.subscriptions().status("late").await.unwrap()[0];
    assert_eq!(status.cursor, start);
    assert!(
        status.lag.held_back.is_some(),
        "its status says it is held back"
    );
    tx_a.commit().await.unwrap();
    tokio::time::timeout(LIMIT, async {
        while seen.ids().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the subscription delivers both");
    stop.send(()).unwrap();
    worker.await.unwrap().unwrap();
    assert_eq!(seen.ids(), [a_event, b_event], "A then B, each once");
    let (read, _) = conformance::read_matching_to_end(&store, start, 10, &filter).await;
    assert_eq!(ids(&read), [a_event, b_event], "A then B, each once");
    // The live stream gives the same two, in the same order.
    let mut streamed = Vec::new();
    while streamed.len() < 2 {
        let event = tokio::time::timeout(LIMIT, follow.next())
            .await
            .expect("the stream delivers in time")
            .expect("the stream goes on")
            .unwrap();
        streamed.push(event.event_id);
    }
    assert_eq!(streamed, [a_event, b_event]);
    store.close().await;
}

/// The ids of the events a subscription delivered, in order.
#[derive(Default, Clone)]
struct Seen(std::sync::Arc<std::sync::Mutex<Vec<uuid::Uuid>>>);

impl Seen {
    fn ids(&self) -> Vec<uuid::Uuid> {
        self.0.lock().unwrap().clone()
    }
}

impl annals::subscription::Handler for Seen {
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        _: &mut annals::Transaction<'_>,
    ) -> Result<(), annals::BoxError> {
        self.0
            .lock()
            .unwrap()
            .extend(events.iter().map(|e| e.event_id));
        Ok(())
    }
}
