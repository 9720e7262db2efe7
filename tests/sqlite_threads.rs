//! The SQLite store's threads under cancellation and sharing: commit and load futures dropped at
//! random points, two store handles on one file (two processes' worth of connections), and a
//! one-connection reader set that meets a type name another process wrote.

#![cfg(feature = "sqlite")]

mod conformance;

use std::path::Path;
use std::time::Duration;

use annals::prelude::*;
use annals::rusqlite::Connection;
use conformance::domain::*;

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// A pseudo-random number below `max`, different each call, without a random-number crate.
fn jitter(round: u64, max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % max
}

async fn new_counter(store: &Store) -> AggregateId {
    store
        .transact(async |ctx| {
            let mut c = ctx.create::<Counter>()?;
            ctx.apply(&mut c, CounterEvent::Reset(0))?;
            Ok::<_, Error>(c.id())
        })
        .await
        .unwrap()
}

/// What happened to one increment whose futures may have been dropped.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    /// The commit answered `Ok`.
    acknowledged: u64,
    /// The load or the commit was dropped before it answered: it may or may not have landed.
    dropped: u64,
}

/// `rounds` increments of `id`, each load and commit under a timeout of a few microseconds,
/// so that futures are dropped before, while and after the threads run them.
async fn increments_with_drops(store: Store, id: AggregateId, rounds: u64, seed: u64) -> Tally {
    let mut tally = Tally::default();
    for round in 0..rounds {
        let r = seed * 1_000_003 + round;
        let mut ctx = store.begin();
        let load = tokio::time::timeout(
            Duration::from_micros(jitter(r, 400)),
            ctx.load::<Counter>(id),
        )
        .await;
        let mut counter = match load {
            Ok(loaded) => loaded.unwrap(),
            Err(_) => {
                tally.dropped += 1;
                continue;
            }
        };
        ctx.apply(&mut counter, CounterEvent::Incremented).unwrap();
        match tokio::time::timeout(Duration::from_micros(jitter(r + 1, 600)), ctx.commit()).await {
            Ok(Ok(_)) => tally.acknowledged += 1,
            // Another task, or a dropped commit that still landed, moved the counter first.
            Ok(Err(Error::Conflict { .. })) => {}
            Ok(Err(other)) => panic!("round {round}: {other:?}"),
            Err(_) => tally.dropped += 1,
        }
    }
    tally
}

/// After the drops: the writer takes commits and the readers serve loads, and the counter's
/// history is whole.
async fn check_consistent(stores: &[Store], id: AggregateId, tally: Tally, path: &Path) {
    for store in stores {
        let committed = tokio::time::timeout(
            Duration::from_secs(120),
            store.transact_with_retry(Retry::attempts(1_000), async |ctx| {
                let mut c = ctx.load::<Counter>(id).await?;
                ctx.apply(&mut c, CounterEvent::Incremented)?;
                Ok::<_, Error>(())
            }),
        )
        .await;
        assert!(
            matches!(committed, Ok(Ok(()))),
            "a commit after the drops: {committed:?}"
        );
    }
    let extra = stores.len() as u64;
    for store in stores {
        let counter = store.begin_read_only().load::<Counter>(id).await.unwrap();
        assert!(
            counter.value >= tally.acknowledged + extra,
            "every acknowledged commit is there: {} < {}",
            counter.value,
            tally.acknowledged + extra
        );
        assert!(
            counter.value <= tally.acknowledged + tally.dropped + extra,
            "no commit landed twice: {} > {tally:?} + {extra}",
            counter.value
        );
        assert_eq!(
            counter.version(),
            counter.value + 1,
            "one event per increment"
        );
        assert_eq!(
            conformance::versions(store, id).await,
            (1..=counter.version()).collect::<Vec<_>>(),
            "versions with no gap"
        );
        let feed = store.read_feed(FeedCursor::START, 100_000).await.unwrap();
        assert_eq!(feed.len() as u64, counter.version());
    }
    let conn = Connection::open(path).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_commits_and_loads_never_wedge_the_store() {
    drops_on_one_store().await;
}

/// On a current-thread runtime loads run on blocking threads, where a dropped load leaves its
/// work running: the reader must still come back.
#[tokio::test(flavor = "current_thread")]
async fn dropped_commits_and_loads_never_wedge_the_store_on_one_thread() {
    drops_on_one_store().await;
}

async fn drops_on_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drops.db");
    // Two readers for four tasks: a reader kept by a dropped load would starve the others.
    let store = Store::open_with(&url(&path), StoreOptions::new().pool_size(2))
        .await
        .unwrap();
    let id = new_counter(&store).await;
    let tasks: Vec<_> = (0..4)
        .map(|seed| tokio::spawn(increments_with_drops(store.clone(), id, 150, seed)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        let t = task.await.unwrap();
        tally.acknowledged += t.acknowledged;
        tally.dropped += t.dropped;
    }
    assert!(tally.dropped > 0, "some futures were dropped: {tally:?}");
    assert!(
        tally.acknowledged > 0,
        "some commits went through: {tally:?}"
    );
    check_consistent(std::slice::from_ref(&store), id, tally, &path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_store_handles_on_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let first = Store::open(&url(&path)).await.unwrap();
    // A second handle has its own writer thread and readers, as another process would.
    let second = Store::open_with(&url(&path), StoreOptions::new().pool_size(1))
        .await
        .unwrap();
    let id = new_counter(&first).await;

    // Contended increments through both writers: none lost, none doubled.
    let handles: Vec<_> = (0..6u64)
        .map(|i| {
            let store = if i % 2 == 0 { &first } else { &second }.clone();
            tokio::spawn(async move {
                for _ in 0..40 {
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
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
    let counter = second.begin_read_only().load::<Counter>(id).await.unwrap();
    assert_eq!((counter.value, counter.version()), (240, 241));

    // And with futures dropped at random on both handles at once.
    let a = tokio::spawn(increments_with_drops(first.clone(), id, 100, 7));
    let b = tokio::spawn(increments_with_drops(second.clone(), id, 100, 11));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let tally = Tally {
        acknowledged: a.acknowledged + b.acknowledged + 240,
        dropped: a.dropped + b.dropped,
    };
    check_consistent(&[first, second], id, tally, &path).await;
}

#[tokio::test]
async fn one_reader_meets_a_type_written_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.db");
    let store = Store::open_with(&url(&path), StoreOptions::new().pool_size(1))
        .await
        .unwrap();
    let id = store
        .transact(async |ctx| {
            let mut a = ctx.create_with_key::<Account>("frozen").await?;
            ctx.apply(&mut a, Opened { owner: "F".into() })?;
            ctx.apply(&mut a, Deposited { amount: 5 })?;
            Ok::<_, Error>(a.id())
        })
        .await
        .unwrap();
    let position = store.history(id).await.unwrap()[1].position();

    // Another process writes an event type this store has never seen, and uses it.
    let conn = Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO annals_event_types (name) VALUES ('account.frozen')",
        [],
    )
    .unwrap();
    conn.execute(
        "UPDATE annals_events SET event_type_id = \
         (SELECT id FROM annals_event_types WHERE name = 'account.frozen') WHERE position = ?1",
        [position as i64],
    )
    .unwrap();
    drop(conn);

    // The one reader re-reads the type table over its own connection: the typed error, at
    // once, instead of waiting for a second connection that cannot come.
    match store.begin_read_only().load::<Account>(id).await {
        Err(Error::UnknownEventType {
            event_type,
            position: at,
            ..
        }) => assert_eq!((event_type.as_str(), at), ("account.frozen", position)),
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    let feed = store.read_feed(FeedCursor::START, 10).await.unwrap();
    assert_eq!(feed[1].event_type, "account.frozen");
}
