//! The plain log API on every store: appends at an expected version without a load, stream
//! reads by version range and direction, and the feed's head.

use std::collections::HashSet;
use std::sync::Arc;

use annals::prelude::*;
use annals::{Error, ExpectedVersion, NewEvent};
use tokio::sync::Barrier;

use super::domain::*;

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version).collect()
}

fn read(events: Result<Vec<RecordedEvent>, Error>) -> Vec<u64> {
    versions(&events.unwrap())
}

async fn balance_of(store: &Store, id: AggregateId) -> (i64, u64) {
    let account = store.begin_read_only().load::<Account>(id).await.unwrap();
    (account.balance, account.version())
}

pub async fn appends_check_the_expected_version(store: &Store) {
    let id = AggregateId::new();
    let opened = store
        .append::<Account>(
            id,
            ExpectedVersion::NoStream,
            [
                NewEvent::new(Opened {
                    owner: "Ann".into(),
                }),
                NewEvent::new(Deposited { amount: 10 })
                    .with_metadata(Metadata::new().reference("import-1")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(opened.aggregate(), id);
    assert_eq!((opened.versions(), opened.version()), (1..3, 2));
    assert!(!opened.already_committed());

    // The cursors are the events' places in the feed.
    let history = store.history(id).await.unwrap();
    let cursors: Vec<FeedCursor> = history.iter().map(|e| e.cursor).collect();
    assert_eq!(opened.cursors(), cursors.as_slice());
    assert_eq!(history[1].metadata.reference.as_deref(), Some("import-1"));
    assert_eq!(history[0].aggregate_type, "account");

    let next = store
        .append::<Account>(id, ExpectedVersion::Exact(2), [Deposited { amount: 5 }])
        .await
        .unwrap();
    assert_eq!(next.versions(), 3..4);
    let any = store
        .append::<Account>(
            id,
            ExpectedVersion::Any,
            [Withdrawn { amount: 1 }, Withdrawn { amount: 2 }],
        )
        .await
        .unwrap();
    assert_eq!(any.versions(), 4..6);
    assert!(any.cursors()[0] < any.cursors()[1]);
    assert!(opened.cursors()[1] < next.cursors()[0]);
    assert_eq!(balance_of(store, id).await, (12, 5));

    // A stale or wrong expectation writes nothing.
    let stale = store
        .append::<Account>(id, ExpectedVersion::Exact(4), [Deposited { amount: 100 }])
        .await;
    assert!(
        matches!(
            stale,
            Err(Error::Conflict {
                expected: 4,
                actual: 5,
                ..
            })
        ),
        "{stale:?}"
    );
    let exists = store
        .append::<Account>(id, ExpectedVersion::NoStream, [Deposited { amount: 100 }])
        .await;
    assert!(
        matches!(
            exists,
            Err(Error::Conflict {
                expected: 0,
                actual: 5,
                ..
            })
        ),
        "{exists:?}"
    );
    let missing = store
        .append::<Account>(
            AggregateId::new(),
            ExpectedVersion::Exact(3),
            [Deposited { amount: 100 }],
        )
        .await;
    assert!(
        matches!(
            missing,
            Err(Error::Conflict {
                expected: 3,
                actual: 0,
                ..
            })
        ),
        "{missing:?}"
    );
    // An event the aggregate does not list, and an id of another type.
    let foreign = store
        .append::<Account>(id, ExpectedVersion::Any, [Ticked])
        .await;
    assert!(
        matches!(&foreign, Err(Error::UnknownEventType { event_type, .. }) if event_type == "meter.ticked"),
        "{foreign:?}"
    );
    let wrong_type = store
        .append::<Meter>(id, ExpectedVersion::Any, [Ticked])
        .await;
    assert!(
        matches!(&wrong_type, Err(Error::IdTaken { found_type, .. }) if found_type == "account"),
        "{wrong_type:?}"
    );
    assert_eq!(balance_of(store, id).await, (12, 5));

    // No events: the expectation is checked, nothing is written.
    let none = store
        .append::<Account>(id, ExpectedVersion::Exact(5), Vec::<NewEvent>::new())
        .await
        .unwrap();
    assert_eq!((none.versions(), none.cursors().len()), (6..6, 0));
    assert!(
        store
            .append::<Account>(id, ExpectedVersion::Exact(1), Vec::<NewEvent>::new())
            .await
            .is_err()
    );
    assert_eq!(store.history(id).await.unwrap().len(), 5);

    // A context sees the appended events, and its own commit checks the version they set.
    let mut ctx = store.begin();
    let mut account = ctx.load::<Account>(id).await.unwrap();
    store
        .append::<Account>(id, ExpectedVersion::Exact(5), [Deposited { amount: 1 }])
        .await
        .unwrap();
    ctx.apply(&mut account, Deposited { amount: 1 }).unwrap();
    assert!(matches!(
        ctx.commit().await,
        Err(Error::Conflict {
            expected: 5,
            actual: 6,
            ..
        })
    ));
}

pub async fn appends_at_any_stay_contiguous_under_contention(store: &Store) {
    const TASKS: usize = 6;
    const ROUNDS: usize = 8;
    let id = AggregateId::new();
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut ranges = Vec::new();
            for round in 0..ROUNDS {
                let amount = (task * 100 + round) as i64;
                let appended = store
                    .append::<Account>(
                        id,
                        ExpectedVersion::Any,
                        [Deposited { amount }, Deposited { amount }],
                    )
                    .await
                    .unwrap();
                ranges.push((appended.versions(), amount));
            }
            ranges
        }));
    }
    let mut seen = HashSet::new();
    let mut expected_balance = 0;
    let mut all = Vec::new();
    for task in tasks {
        let ranges = tokio::time::timeout(std::time::Duration::from_secs(120), task)
            .await
            .expect("the appends finish")
            .unwrap();
        all.extend(ranges);
    }
    let history = store.history(id).await.unwrap();
    assert_eq!(
        versions(&history),
        (1..=(TASKS * ROUNDS * 2) as u64).collect::<Vec<_>>()
    );
    for (range, amount) in all {
        assert_eq!(range.end - range.start, 2);
        for version in range {
            assert!(seen.insert(version), "version {version} given twice");
            // Each append's two events sit at the versions it reported.
            let event = &history[(version - 1) as usize];
            assert_eq!(
                event.decode::<Deposited>().unwrap(),
                Some(Deposited { amount })
            );
            expected_balance += amount;
        }
    }
    assert_eq!(balance_of(store, id).await.0, expected_balance);
}

pub async fn appends_with_chosen_ids_apply_once(store: &Store) {
    let id = AggregateId::new();
    let ids = [uuid::Uuid::now_v7(), uuid::Uuid::now_v7()];
    let events = || {
        [
            NewEvent::new(Opened { owner: "Bo".into() }).with_id(ids[0]),
            NewEvent::new(Deposited { amount: 7 }).with_id(ids[1]),
        ]
    };
    let first = store
        .append::<Account>(id, ExpectedVersion::NoStream, events())
        .await
        .unwrap();
    // The retry after a lost answer: the stream exists now, yet it is already committed.
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Any] {
        let again = store
            .append::<Account>(id, expected, events())
            .await
            .unwrap();
        assert!(again.already_committed());
        assert_eq!(again.versions(), first.versions());
        assert_eq!(again.cursors(), first.cursors());
    }
    assert_eq!(balance_of(store, id).await, (7, 2));
    let history = store.history(id).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        ids.to_vec()
    );

    // An id stored for another aggregate.
    let taken = store
        .append::<Account>(
            AggregateId::new(),
            ExpectedVersion::Any,
            [NewEvent::new(Opened { owner: "X".into() }).with_id(ids[0])],
        )
        .await;
    assert!(
        matches!(taken, Err(Error::EventIdTaken { event_id }) if event_id == ids[0]),
        "{taken:?}"
    );
}

pub async fn streams_read_by_range_and_direction(store: &Store) {
    let id = super::open_account(store, "reader", "Rea", 0).await;
    store
        .append::<Account>(
            id,
            ExpectedVersion::Exact(1),
            (1..=9).map(|amount| Deposited { amount }),
        )
        .await
        .unwrap();
    let all = store.read_stream(id).await.unwrap();
    assert_eq!(versions(&all), (1..=10).collect::<Vec<_>>());
    assert!(
        all.iter()
            .all(|e| e.key.as_deref() == Some("reader") && e.aggregate_type == "account")
    );
    assert_eq!(read(store.read_stream(id).versions(3..=5).await), [3, 4, 5]);
    assert_eq!(read(store.read_stream(id).versions(8..).await), [8, 9, 10]);
    assert_eq!(read(store.read_stream(id).versions(..3).await), [1, 2]);
    assert_eq!(
        read(store.read_stream(id).backward().limit(3).await),
        [10, 9, 8]
    );
    assert_eq!(
        read(
            store
                .read_stream(id)
                .versions(..=4)
                .backward()
                .limit(2)
                .await
        ),
        [4, 3]
    );
    assert_eq!(
        read(store.read_stream(id).versions(2..).limit(2).await),
        [2, 3]
    );
    assert!(read(store.read_stream(id).limit(0).await).is_empty());
    assert!(read(store.read_stream(id).versions(..0).await).is_empty());
    assert!(read(store.read_stream(id).versions(11..).await).is_empty());
    assert!(read(store.read_stream(AggregateId::new()).await).is_empty());
    // A history page by page.
    let mut pages = Vec::new();
    let mut after = 0;
    loop {
        let page = read(store.read_stream(id).versions(after + 1..).limit(4).await);
        let Some(&last) = page.last() else { break };
        after = last;
        pages.push(page);
    }
    assert_eq!(pages, [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]);

    // Records carry the key as it is now; the feed and filtered reads too.
    let mut ctx = store.begin();
    let mut account = ctx.load::<Account>(id).await.unwrap();
    ctx.change_key(&mut account, "reader-2").unwrap();
    ctx.commit().await.unwrap();
    let first = store.read_stream(id).limit(1).await.unwrap();
    assert_eq!(first[0].key.as_deref(), Some("reader-2"));
    // (Waiting out a hold-back by another session of a PostgreSQL server.)
    let feed = super::read_feed_to_end(store, FeedCursor::START, 100).await;
    assert_eq!(feed.iter().filter(|e| e.aggregate_id == id).count(), 10);
    assert!(
        feed.iter()
            .filter(|e| e.aggregate_id == id)
            .all(|e| e.key.as_deref() == Some("reader-2"))
    );
    let filtered = store
        .read_feed_matching(FeedCursor::START, 100, &annals::Filter::all().aggregate(id))
        .await
        .unwrap();
    assert_eq!(filtered.len(), 10);
    assert!(
        filtered
            .iter()
            .all(|e| e.key.as_deref() == Some("reader-2"))
    );
    let unkeyed = AggregateId::new();
    store
        .append::<Account>(
            unkeyed,
            ExpectedVersion::NoStream,
            [Deposited { amount: 1 }],
        )
        .await
        .unwrap();
    assert_eq!(store.history(unkeyed).await.unwrap()[0].key, None);
}

pub async fn feed_head_is_the_newest_readable_event(store: &Store) {
    use std::time::Duration;
    // On PostgreSQL other sessions of the server may hold the feed back for a moment: wait
    // until the commit is readable before comparing.
    let visible = |after: FeedCursor| async move {
        assert!(
            store
                .wait_for_events(after, Duration::from_secs(60))
                .await
                .unwrap()
        );
    };
    assert_eq!(store.feed_head().await.unwrap(), FeedCursor::START);
    let id = super::open_account(store, "head", "Hea", 5).await;
    visible(FeedCursor::START).await;
    let head = store.feed_head().await.unwrap();
    let feed = store.read_feed(FeedCursor::START, 100).await.unwrap();
    assert_eq!(feed.len(), 2);
    assert_eq!(Some(head), feed.last().map(|e| e.cursor));
    assert!(store.read_feed(head, 10).await.unwrap().is_empty());

    // A reader starting at the head sees exactly what commits after.
    let appended = store
        .append::<Account>(id, ExpectedVersion::Exact(2), [Deposited { amount: 1 }])
        .await
        .unwrap();
    visible(head).await;
    let after = store.read_feed(head, 10).await.unwrap();
    assert_eq!(
        after.iter().map(|e| e.cursor).collect::<Vec<_>>(),
        appended.cursors()
    );
    assert_eq!(store.feed_head().await.unwrap(), appended.cursors()[0]);
}
