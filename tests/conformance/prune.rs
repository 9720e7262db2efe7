//! Pruning and erasure on every store: events dropped before the newest snapshot with loads still
//! correct, snapshots kept to the newest few, and aggregates erased with a tombstone left in the
//! feed, with feed readers going on past what was deleted.

use std::time::Duration;

use annals::prelude::*;
use annals::{Erased, Error, ExpectedVersion, Filter, Target};

use super::domain::*;

/// A meter with `ticks` ticks, committed five at a time: each commit writes a snapshot.
async fn meter(store: &Store, ticks: u64) -> AggregateId {
    let mut ctx = store.begin();
    let mut meter = ctx.create::<Meter>().unwrap();
    let id = meter.id();
    for tick in 1..=ticks {
        ctx.apply(&mut meter, Ticked).unwrap();
        if tick % 5 == 0 || tick == ticks {
            ctx.commit().await.unwrap();
            ctx = store.begin();
            meter = ctx.load::<Meter>(id).await.unwrap();
        }
    }
    id
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version).collect()
}

/// Every event the feed holds now, read page by page from `after` (waiting out a hold-back by
/// another session of a PostgreSQL server).
async fn feed_from(store: &Store, after: FeedCursor) -> Vec<RecordedEvent> {
    super::read_feed_to_end(store, after, 7).await
}

pub async fn pruned_events_leave_loads_correct(store: &Store) {
    let id = meter(store, 12).await;
    let before = store.history(id).await.unwrap();
    // A reader that stopped on an event that goes.
    let stopped_at = before[3].cursor;

    assert_eq!(store.prune_events(id).await.unwrap(), 10);
    assert_eq!(versions(&store.history(id).await.unwrap()), [11, 12]);
    let loaded = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!((loaded.ticks, loaded.version()), (12, 12));
    assert_eq!(
        loaded.applied_since_load, 2,
        "loaded from the snapshot at 10"
    );
    assert_eq!(store.prune_events(id).await.unwrap(), 0);

    // The feed goes on past the pruned events, from any cursor.
    let after_prune = feed_from(store, FeedCursor::START).await;
    assert_eq!(versions(&after_prune), [11, 12]);
    assert_eq!(versions(&feed_from(store, stopped_at).await), [11, 12]);
    let page = store
        .read_feed_matching(stopped_at, 10, &Filter::all().aggregate(id))
        .await
        .unwrap();
    assert_eq!(versions(&page), [11, 12]);

    // The aggregate lives on; a later prune drops what a newer snapshot covers.
    let mut ctx = store.begin();
    let mut m = ctx.load::<Meter>(id).await.unwrap();
    for _ in 0..4 {
        ctx.apply(&mut m, Ticked).unwrap();
    }
    ctx.commit().await.unwrap();
    assert_eq!(store.prune_events(id).await.unwrap(), 5);
    assert_eq!(versions(&store.history(id).await.unwrap()), [16]);

    // Snapshots: the newest stay.
    assert_eq!(store.prune_snapshots(id, 2).await.unwrap(), 1);
    assert_eq!(store.prune_snapshots(id, 1).await.unwrap(), 1);
    assert_eq!(store.prune_snapshots(id, 1).await.unwrap(), 0);
    let loaded = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!((loaded.ticks, loaded.applied_since_load), (16, 1));
    assert!(matches!(
        store.prune_snapshots(id, 0).await,
        Err(Error::Config(_))
    ));

    // A release whose snapshot shape changed has no snapshot to start from.
    let next = store.begin_read_only().load::<MeterNextRelease>(id).await;
    assert!(
        matches!(
            next,
            Err(Error::EventsPruned {
                aggregate,
                from: 1,
                to: 15
            }) if aggregate == id
        ),
        "{next:?}"
    );

    // An aggregate without snapshots keeps every event; a missing one is not found.
    let account = super::open_account(store, "unpruned", "Una", 5).await;
    assert_eq!(store.prune_events(account).await.unwrap(), 0);
    assert_eq!(store.history(account).await.unwrap().len(), 2);
    let missing = AggregateId::new();
    assert!(matches!(
        store.prune_events(missing).await,
        Err(Error::NotFound { target: Target::Id(id), .. }) if id == missing
    ));
}

pub async fn an_erased_aggregate_leaves_only_its_tombstone(store: &Store) {
    let eve = super::open_account(store, "eve", "Eve", 30).await;
    let other = super::open_account(store, "olga", "Olga", 7).await;
    let history = store.history(eve).await.unwrap();
    let stopped_at = history[0].cursor;
    let deleted_ids: Vec<uuid::Uuid> = history.iter().map(|e| e.event_id).collect();
    // A context that loaded Eve before the erasure.
    let mut stale = store.begin();
    let mut stale_root = stale.load::<Account>(eve).await.unwrap();

    let cursor = store
        .erase(eve, Metadata::new().reference("request-17"))
        .await
        .unwrap()
        .expect("a tombstone");
    let history = store.history(eve).await.unwrap();
    assert_eq!(history.len(), 1);
    let tombstone = &history[0];
    assert_eq!(tombstone.cursor, cursor);
    assert_eq!(
        tombstone.decode::<Erased>().unwrap(),
        Some(Erased::default())
    );
    assert_eq!(tombstone.event_type, "annals.erased");
    assert_eq!(
        (tombstone.aggregate_type.as_str(), tombstone.key.as_deref()),
        ("account", None)
    );
    assert_eq!(tombstone.version, 3);
    assert_eq!(tombstone.metadata.reference.as_deref(), Some("request-17"));

    // Gone for loads, keys, appends and chosen ids; the key is free.
    let mut ctx = store.begin();
    assert!(matches!(
        ctx.load::<Account>(eve).await,
        Err(Error::NotFound { .. })
    ));
    assert!(ctx.find_by_key::<Account>("eve").await.unwrap().is_none());
    assert!(matches!(
        ctx.create_with_id::<Account>(eve).await,
        Err(Error::IdTaken { .. })
    ));
    let again = ctx.load_or_create_by_key::<Account>("eve").await.unwrap();
    assert_ne!(again.id(), eve);
    assert!(matches!(
        store
            .append::<Account>(eve, ExpectedVersion::Any, [Deposited { amount: 1 }])
            .await,
        Err(Error::NotFound { .. })
    ));
    stale
        .apply(&mut stale_root, Deposited { amount: 1 })
        .unwrap();
    assert!(matches!(
        stale.commit().await,
        Err(Error::Conflict {
            expected: 2,
            actual: 3,
            ..
        })
    ));
    // Erasing again writes nothing.
    assert_eq!(store.erase(eve, Metadata::new()).await.unwrap(), None);
    assert_eq!(store.history(eve).await.unwrap().len(), 1);

    // Readers of the feed see the tombstone, not the deleted events, from any cursor.
    for from in [FeedCursor::START, stopped_at] {
        let feed = feed_from(store, from).await;
        assert!(feed.iter().all(|e| !deleted_ids.contains(&e.event_id)));
        assert_eq!(feed.iter().filter(|e| e.aggregate_id == eve).count(), 1);
        assert!(feed.iter().any(|e| e.aggregate_id == other));
    }
    let erased = store
        .read_feed_matching(FeedCursor::START, 10, &Filter::all().event::<Erased>())
        .await
        .unwrap();
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0].aggregate_id, eve);
    // Others are untouched.
    let olga = store
        .begin_read_only()
        .load::<Account>(other)
        .await
        .unwrap();
    assert_eq!((olga.balance, olga.version()), (7, 2));

    let missing = AggregateId::new();
    assert!(matches!(
        store.erase(missing, Metadata::new()).await,
        Err(Error::NotFound { .. })
    ));
}

pub async fn erasure_wins_over_concurrent_commits(store: &Store) {
    let id = super::open_account(store, "busy", "Bus", 1).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            // Deposits until the account is gone; bounded either way.
            for _ in 0..500 {
                let done = store
                    .transact(async |ctx| {
                        let mut account = ctx.load::<Account>(id).await?;
                        ctx.apply(&mut account, Deposited { amount: 1 })?;
                        Ok::<_, Error>(())
                    })
                    .await;
                match done {
                    Ok(()) | Err(Error::Conflict { .. }) => {}
                    Err(Error::NotFound { .. }) => return true,
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            false
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Two erasures at once, while deposits keep landing: one writes the tombstone.
    let (first, second) = tokio::join!(
        store.erase(id, Metadata::new()),
        store.erase(id, Metadata::new())
    );
    let tombstones = [first.unwrap(), second.unwrap()];
    assert_eq!(tombstones.iter().flatten().count(), 1, "{tombstones:?}");
    tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .expect("the writer stops")
        .unwrap();
    let history = store.history(id).await.unwrap();
    assert_eq!(history.len(), 1, "only the tombstone is left");
    assert!(history[0].decode::<Erased>().unwrap().is_some());
    // No deposit lands after it.
    let late = store
        .transact(async |ctx| {
            let mut account = ctx.load::<Account>(id).await?;
            ctx.apply(&mut account, Deposited { amount: 1 })?;
            Ok::<_, Error>(())
        })
        .await;
    assert!(matches!(late, Err(Error::NotFound { .. })), "{late:?}");
    assert!(
        store
            .begin_read_only()
            .find_by_key::<Account>("busy")
            .await
            .unwrap()
            .is_none()
    );
}
