//! The conformance suite: every store passes all of it. Each case is a generic async function
//! over a [`Store`]; [`conformance_suite!`] turns them into `#[tokio::test]`s for one backend.

#![allow(dead_code)]

pub mod cache;
pub mod domain;
pub mod evolution;
pub mod idempotency;
pub mod keys;
pub mod log;
pub mod prune;
pub mod subscriptions;

#[allow(unused_imports)]
pub use evolution::*;
#[allow(unused_imports)]
pub use idempotency::*;
#[allow(unused_imports)]
pub use keys::*;
#[allow(unused_imports)]
pub use log::*;
#[allow(unused_imports)]
pub use prune::*;
#[allow(unused_imports)]
pub use subscriptions::*;

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use annals::prelude::*;
use annals::{Error, Target};
use tokio::sync::Barrier;

use domain::*;

/// Generates one `#[tokio::test]` per conformance case, with the attributes given as
/// `attributes = [...]` (`#[cfg_attr(..., ignore = "...")]` for a backend that may be absent). `$open` is an async
/// expression that yields `(Store, guard)`: a fresh, empty store for that test, and whatever
/// must stay alive while it is used (a temp dir, a schema); or an `Option` of that, `None`
/// skipping the test (a database server that is not configured).
#[macro_export]
macro_rules! conformance_suite {
    (attributes = $attrs:tt, $open:expr) => {
        $crate::conformance_suite!(@cases $attrs $open;
            round_trip,
            history_and_metadata,
            enum_events_round_trip,
            transfer_commits_both,
            failed_closure_commits_nothing,
            dropped_context_commits_nothing,
            created_without_events_writes_nothing,
            conflicting_contexts,
            conflict_between_tasks,
            natural_key_unique_under_concurrency,
            key_taken_in_same_context,
            load_or_create_race_resolves_through_retry,
            create_with_id_refuses_a_taken_id,
            load_twice_in_one_context,
            not_found_and_wrong_type,
            read_only_context,
            snapshots_are_used,
            snapshot_version_mismatch_rebuilds,
            retry_helper_counts_to_400,
            retry_reruns_on_conflict_only,
            helpers_with_borrowed_arguments_run_in_spawned_tasks,
            feed_each_event_once_in_commit_order,
            payload_too_large_is_refused,
            odd_payloads_round_trip,
            apply_applies_what_reads_back,
            snapshot_that_does_not_encode_is_an_error,
            enum_events_store_the_variant_content,
            wait_for_events_takes_any_timeout,
            filtered_feed_reads_only_what_matches,
            follow_catches_up_then_tails,
            subscription_delivers_each_event_once_in_order,
            subscription_effects_commit_with_the_cursor,
            subscription_stops_on_a_poison_event,
            subscription_settings_are_checked_and_reset,
            subscription_starts_where_asked,
            subscription_pauses_and_resumes,
            subscription_workers_share_by_lease,
            subscription_stale_worker_cannot_checkpoint,
            subscription_clones_never_store_a_batch_twice,
            subscription_partitions_keep_each_aggregate_in_order,
            subscription_workers_rebalance_partitions,
            subscription_parks_a_poison_event_and_goes_on,
            typed_projection_takes_its_events,
            every_stored_version_reads_as_the_current_one,
            a_newer_version_than_the_code_knows_is_refused,
            keys_change_and_are_released,
            a_taken_key_fails_the_commit_and_writes_nothing,
            key_changes_stay_unique_under_concurrency,
            keys_are_bytes_and_bounded,
            a_retried_commit_is_already_committed,
            chosen_event_ids_are_checked,
            appends_check_the_expected_version,
            appends_at_any_stay_contiguous_under_contention,
            appends_with_chosen_ids_apply_once,
            streams_read_by_range_and_direction,
            feed_head_is_the_newest_readable_event,
            pruned_events_leave_loads_correct,
            an_erased_aggregate_leaves_only_its_tombstone,
            erasure_wins_over_concurrent_commits,
            subscription_goes_on_past_erased_events,
        );
    };
    ($open:expr) => {
        $crate::conformance_suite!(attributes = [], $open);
    };
    (@cases $attrs:tt $open:expr; $($case:ident),* $(,)?) => {
        $(
            $crate::conformance_suite!(@case $attrs $open; $case);
        )*
    };
    (@case [$(#[$attr:meta])*] $open:expr; $case:ident) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some((store, _guard)) = $crate::conformance::OpenedStore::opened($open.await)
            else {
                return;
            };
            $crate::conformance::$case(&store).await;
            store.close().await;
        }
    };
}

/// What a `conformance_suite!` open expression yields: a store and its guard, or `None` to skip.
pub trait OpenedStore {
    type Guard;
    fn opened(self) -> Option<(Store, Self::Guard)>;
}

impl<G> OpenedStore for (Store, G) {
    type Guard = G;
    fn opened(self) -> Option<(Store, G)> {
        Some(self)
    }
}

impl<G> OpenedStore for Option<(Store, G)> {
    type Guard = G;
    fn opened(self) -> Option<(Store, G)> {
        self
    }
}

/// Opens the account `key` for `owner`, with one deposit when `deposit` is positive.
pub async fn open_account(store: &Store, key: &str, owner: &str, deposit: i64) -> AggregateId {
    store
        .transact(async |ctx| {
            let mut account = ctx.create_with_key::<Account>(key).await?;
            ctx.apply(
                &mut account,
                Opened {
                    owner: owner.to_owned(),
                },
            )?;
            if deposit > 0 {
                ctx.apply(&mut account, Deposited { amount: deposit })?;
            }
            Ok::<_, Error>(account.id())
        })
        .await
        .expect("open account")
}

async fn balance(store: &Store, key: &str) -> (i64, u64) {
    let account = store
        .begin_read_only()
        .load_by_key::<Account>(key)
        .await
        .expect("load account");
    (account.balance, account.version())
}

pub async fn round_trip(store: &Store) {
    let id = open_account(store, "alice", "Alice", 100).await;

    let mut ctx = store.begin_read_only();
    let by_id = ctx.load::<Account>(id).await.unwrap();
    assert_eq!(by_id.id(), id);
    assert_eq!(by_id.key(), Some("alice"));
    assert_eq!(by_id.version(), 2);
    assert_eq!(by_id.owner, "Alice");
    assert_eq!(by_id.balance, 100);

    store
        .transact(async |ctx| {
            let mut alice = ctx.load_by_key::<Account>("alice").await?;
            ctx.apply(&mut alice, Deposited { amount: 5 })?;
            ctx.apply(&mut alice, Withdrawn { amount: 30 })?;
            assert_eq!(alice.version(), 4);
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(balance(store, "alice").await, (75, 4));
}

pub async fn history_and_metadata(store: &Store) {
    let correlation = uuid::Uuid::now_v7();
    let (id, deposit_id) = store
        .transact(async |ctx| {
            ctx.set_metadata(
                Metadata::new()
                    .correlation_id(correlation)
                    .reference("request-7")
                    .header("tenant", "acme"),
            );
            let mut a = ctx.create::<Account>()?;
            let opened = ctx.apply(
                &mut a,
                Opened {
                    owner: "Ann".into(),
                },
            )?;
            let deposit = ctx.apply_with(
                &mut a,
                Deposited { amount: 9 },
                Metadata::new().causation_id(opened).header("user", "u1"),
            )?;
            Ok::<_, Error>((a.id(), deposit))
        })
        .await
        .unwrap();

    let history = store.history(id).await.unwrap();
    let summary: Vec<(u64, &str, u32)> = history
        .iter()
        .map(|e| (e.version, e.event_type.as_str(), e.schema_version))
        .collect();
    assert_eq!(
        summary,
        [(1, "account.opened", 1), (2, "account.deposited", 2)]
    );
    assert!(
        history
            .iter()
            .all(|e| e.aggregate_id == id && e.aggregate_type == "account")
    );
    assert_eq!(
        history[0].decode::<Opened>().unwrap(),
        Some(Opened {
            owner: "Ann".into()
        })
    );
    assert_eq!(history[0].decode::<Deposited>().unwrap(), None);
    assert_eq!(
        history[1].payload_json().unwrap(),
        serde_json::json!({ "amount": 9 })
    );
    assert_eq!(history[1].event_id, deposit_id);
    assert_ne!(history[0].event_id, history[1].event_id);
    let age = history[0].recorded_at.elapsed().unwrap_or_default();
    assert!(
        age < Duration::from_secs(600),
        "recorded_at is the commit time"
    );

    let first = &history[0].metadata;
    assert_eq!(first.correlation_id, Some(correlation));
    assert_eq!(first.reference.as_deref(), Some("request-7"));
    assert_eq!(first.causation_id, None);
    let second = &history[1].metadata;
    assert_eq!(second.correlation_id, Some(correlation));
    assert_eq!(second.causation_id, Some(history[0].event_id));
    let headers: Vec<(&str, &str)> = second
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(headers, [("tenant", "acme"), ("user", "u1")]);
}

pub async fn enum_events_round_trip(store: &Store) {
    let id = store
        .transact(async |ctx| {
            let mut c = ctx.create::<Counter>()?;
            ctx.apply(&mut c, CounterEvent::Incremented)?;
            ctx.apply(&mut c, CounterEvent::Added { by: 10 })?;
            ctx.apply(&mut c, CounterEvent::Incremented)?;
            ctx.apply(&mut c, CounterEvent::Reset(3))?;
            ctx.apply(&mut c, CounterEvent::Incremented)?;
            Ok::<_, Error>(c.id())
        })
        .await
        .unwrap();
    let counter = store.begin_read_only().load::<Counter>(id).await.unwrap();
    assert_eq!((counter.value, counter.version()), (4, 5));
    let names: Vec<String> = store
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        names,
        [
            "counter.incremented",
            "counter.added",
            "counter.incremented",
            "Reset",
            "counter.incremented"
        ]
    );
    let history = store.history(id).await.unwrap();
    assert_eq!(
        history[1].decode::<CounterEvent>().unwrap(),
        Some(CounterEvent::Added { by: 10 })
    );
}

pub async fn transfer_commits_both(store: &Store) {
    open_account(store, "alice", "Alice", 100).await;
    open_account(store, "bob", "Bob", 0).await;
    store
        .transact(async |ctx| {
            let mut alice = ctx.load_by_key::<Account>("alice").await?;
            let mut bob = ctx.load_by_key::<Account>("bob").await?;
            let w = alice.withdraw(30)?;
            ctx.apply(&mut alice, w)?;
            ctx.apply(&mut bob, Deposited { amount: 30 })?;
            Ok::<_, BankError>(())
        })
        .await
        .unwrap();
    assert_eq!(balance(store, "alice").await, (70, 3));
    assert_eq!(balance(store, "bob").await, (30, 2));
}

pub async fn failed_closure_commits_nothing(store: &Store) {
    open_account(store, "alice", "Alice", 100).await;
    open_account(store, "bob", "Bob", 0).await;
    let feed_before = read_feed_to_end(store, FeedCursor::START, 1000).await.len();

    // Both aggregates get an event, a new one is created, then the domain refuses.
    let result = store
        .transact(async |ctx| {
            let mut bob = ctx.load_by_key::<Account>("bob").await?;
            ctx.apply(&mut bob, Deposited { amount: 500 })?;
            let mut carol = ctx.create_with_key::<Account>("carol").await?;
            ctx.apply(
                &mut carol,
                Opened {
                    owner: "Carol".into(),
                },
            )?;
            let mut alice = ctx.load_by_key::<Account>("alice").await?;
            ctx.apply(&mut alice, Deposited { amount: 1 })?;
            let w = alice.withdraw(500)?;
            ctx.apply(&mut alice, w)?;
            Ok::<_, BankError>(())
        })
        .await;
    assert_eq!(
        result,
        Err(BankError::Overdrawn {
            balance: 101,
            wanted: 500
        })
    );
    assert_eq!(balance(store, "alice").await, (100, 2));
    assert_eq!(balance(store, "bob").await, (0, 1));
    let carol = store
        .begin_read_only()
        .find_by_key::<Account>("carol")
        .await
        .unwrap();
    assert!(carol.is_none());
    let feed_after = read_feed_to_end(store, FeedCursor::START, 1000).await.len();
    assert_eq!(feed_before, feed_after);
}

pub async fn dropped_context_commits_nothing(store: &Store) {
    open_account(store, "alice", "Alice", 10).await;
    {
        let mut ctx = store.begin();
        let mut alice = ctx.load_by_key::<Account>("alice").await.unwrap();
        ctx.apply(&mut alice, Deposited { amount: 5 }).unwrap();
        assert_eq!(ctx.staged_events(), 1);
        drop(ctx);
    }
    assert_eq!(balance(store, "alice").await, (10, 2));

    let mut ctx = store.begin();
    let mut alice = ctx.load_by_key::<Account>("alice").await.unwrap();
    ctx.apply(&mut alice, Deposited { amount: 5 }).unwrap();
    ctx.commit().await.unwrap();
    assert_eq!(balance(store, "alice").await, (15, 3));
}

pub async fn created_without_events_writes_nothing(store: &Store) {
    let id = store
        .transact(async |ctx| {
            let a = ctx.load_or_create_by_key::<Account>("ghost").await?;
            assert_eq!(a.version(), 0);
            Ok::<_, Error>(a.id())
        })
        .await
        .unwrap();
    let mut ctx = store.begin_read_only();
    assert!(ctx.find_by_key::<Account>("ghost").await.unwrap().is_none());
    assert!(matches!(
        ctx.load::<Account>(id).await,
        Err(Error::NotFound { .. })
    ));
    assert!(
        read_feed_to_end(store, FeedCursor::START, 10)
            .await
            .is_empty()
    );
}

pub async fn conflicting_contexts(store: &Store) {
    let id = open_account(store, "alice", "Alice", 100).await;

    let mut first = store.begin();
    let mut second = store.begin();
    let mut a1 = first.load::<Account>(id).await.unwrap();
    let mut a2 = second.load::<Account>(id).await.unwrap();
    // The second context also creates an aggregate: it must not be written either.
    let mut b2 = second.create_with_key::<Account>("bob").await.unwrap();
    first.apply(&mut a1, Deposited { amount: 1 }).unwrap();
    second.apply(&mut a2, Deposited { amount: 2 }).unwrap();
    second.apply(&mut a2, Deposited { amount: 3 }).unwrap();
    second
        .apply(
            &mut b2,
            Opened {
                owner: "Bob".into(),
            },
        )
        .unwrap();

    first.commit().await.unwrap();
    match second.commit().await {
        Err(Error::Conflict {
            aggregate_type,
            aggregate,
            expected,
            actual,
        }) => {
            assert_eq!(aggregate_type, "account");
            assert_eq!(aggregate, id);
            assert_eq!((expected, actual), (2, 3));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(balance(store, "alice").await, (101, 3));
    let bob = store
        .begin_read_only()
        .find_by_key::<Account>("bob")
        .await
        .unwrap();
    assert!(
        bob.is_none(),
        "nothing of the conflicting context is written"
    );
}

pub async fn conflict_between_tasks(store: &Store) {
    let id = open_account(store, "alice", "Alice", 0).await;
    let barrier = Arc::new(Barrier::new(2));
    let tasks: Vec<_> = (0..2)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut ctx = store.begin();
                let mut a = ctx.load::<Account>(id).await?;
                ctx.apply(&mut a, Deposited { amount: 10 + i })?;
                barrier.wait().await;
                ctx.commit().await
            })
        })
        .collect();
    let mut ok = 0;
    let mut conflicts = 0;
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(Ok(_))) => ok += 1,
            Ok(Ok(Err(Error::Conflict { .. }))) => conflicts += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 1));
    let (balance, version) = balance(store, "alice").await;
    assert_eq!(version, 2);
    assert!(balance == 10 || balance == 11);
}

pub async fn natural_key_unique_under_concurrency(store: &Store) {
    const TASKS: usize = 8;
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut ctx = store.begin();
                let mut a = ctx.create_with_key::<Account>("shared").await?;
                ctx.apply(
                    &mut a,
                    Opened {
                        owner: format!("owner {i}"),
                    },
                )?;
                barrier.wait().await;
                ctx.commit().await
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(Ok(_))) => ok += 1,
            Ok(Ok(Err(Error::KeyTaken {
                aggregate_type,
                key,
            }))) => {
                assert_eq!(
                    (aggregate_type.as_str(), key.as_str()),
                    ("account", "shared")
                );
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(ok, 1, "exactly one creator wins the key");
    let feed = read_feed_to_end(store, FeedCursor::START, 100).await;
    assert_eq!(feed.len(), 1, "the losers wrote nothing");
    let (_, version) = balance(store, "shared").await;
    assert_eq!(version, 1);
}

pub async fn key_taken_in_same_context(store: &Store) {
    open_account(store, "alice", "Alice", 0).await;
    let mut ctx = store.begin();
    assert!(matches!(
        ctx.create_with_key::<Account>("alice").await,
        Err(Error::KeyTaken { .. })
    ));
    ctx.create_with_key::<Account>("dora").await.unwrap();
    assert!(matches!(
        ctx.create_with_key::<Account>("dora").await,
        Err(Error::KeyTaken { .. })
    ));
    // A key is per aggregate type: a counter may use it.
    ctx.create_with_key::<Counter>("alice").await.unwrap();
}

/// 16 tasks sign up one key at once through `load_or_create_by_key` and the retry helper: a
/// key clash at commit is a conflict there, so every task ends up succeeding, the losers on the
/// aggregate the winner created.
pub async fn load_or_create_race_resolves_through_retry(store: &Store) {
    const TASKS: usize = 16;
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
                store
                    .transact_with_retry(Retry::attempts(100), async |ctx| {
                        let mut a = ctx.load_or_create_by_key::<Account>("signup").await?;
                        if a.version() == 0 {
                            ctx.apply(
                                &mut a,
                                Opened {
                                    owner: format!("owner {i}"),
                                },
                            )?;
                        }
                        ctx.apply(&mut a, Deposited { amount: 1 })?;
                        // Only the first attempts meet: every task creates the key.
                        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            barrier.wait().await;
                        }
                        Ok::<_, Error>(a.id())
                    })
                    .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(120), task).await {
            Ok(Ok(Ok(id))) => {
                ids.insert(id);
            }
            other => panic!("every signup succeeds through the retry, got {other:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "one aggregate for the key");
    assert_eq!(
        balance(store, "signup").await,
        (TASKS as i64, TASKS as u64 + 1)
    );

    // Without the retry helper, the loser of such a race sees a conflict, not `KeyTaken`.
    let mut first = store.begin();
    let mut second = store.begin();
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
    match second.commit().await {
        Err(Error::Conflict {
            aggregate_type,
            aggregate,
            expected,
            actual,
        }) => {
            assert_eq!(aggregate_type, "account");
            assert_eq!(aggregate, b.id());
            assert_eq!((expected, actual), (0, 1));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // `create_with_key` keeps `KeyTaken` for the same race.
    let mut first = store.begin();
    let mut second = store.begin();
    let mut a = first.create_with_key::<Account>("later").await.unwrap();
    let mut b = second.create_with_key::<Account>("later").await.unwrap();
    first.apply(&mut a, Deposited { amount: 1 }).unwrap();
    second.apply(&mut b, Deposited { amount: 2 }).unwrap();
    first.commit().await.unwrap();
    assert!(matches!(
        second.commit().await,
        Err(Error::KeyTaken { key, .. }) if key == "later"
    ));
}

pub async fn create_with_id_refuses_a_taken_id(store: &Store) {
    let chosen = AggregateId::from(uuid::Uuid::now_v7());
    let mut ctx = store.begin();
    let mut account = ctx.create_with_id::<Account>(chosen).await.unwrap();
    assert_eq!((account.id(), account.version()), (chosen, 0));
    ctx.apply(
        &mut account,
        Opened {
            owner: "Imported".into(),
        },
    )
    .unwrap();
    // Taken in this context already.
    assert!(matches!(
        ctx.create_with_id::<Counter>(chosen).await,
        Err(Error::IdTaken { aggregate, found_type }) if aggregate == chosen && found_type == "account"
    ));
    ctx.commit().await.unwrap();
    let loaded = store
        .begin_read_only()
        .load::<Account>(chosen)
        .await
        .unwrap();
    assert_eq!((loaded.owner.as_str(), loaded.version()), ("Imported", 1));

    // Taken in the store, by another type too.
    match store.begin().create_with_id::<Counter>(chosen).await {
        Err(Error::IdTaken {
            aggregate,
            found_type,
        }) => assert_eq!((aggregate, found_type.as_str()), (chosen, "account")),
        other => panic!("expected IdTaken, got {other:?}"),
    }
    assert!(matches!(
        store
            .begin_read_only()
            .create_with_id::<Account>(AggregateId::new())
            .await,
        Err(Error::ReadOnly)
    ));

    // Two contexts choose one id: the second commit is refused with `IdTaken`, writing nothing.
    let uuid = uuid::Uuid::now_v7();
    let contested = AggregateId::from(uuid);
    let mut first = store.begin();
    let mut second = store.begin();
    let mut a = first.create_with_id::<Account>(contested).await.unwrap();
    // A plain UUID is taken too.
    let mut b = second.create_with_id::<Counter>(uuid).await.unwrap();
    let mut other = second.create::<Account>().unwrap();
    first.apply(&mut a, Deposited { amount: 1 }).unwrap();
    second.apply(&mut b, CounterEvent::Incremented).unwrap();
    second.apply(&mut other, Deposited { amount: 1 }).unwrap();
    first.commit().await.unwrap();
    match second.commit().await {
        Err(Error::IdTaken {
            aggregate,
            found_type,
        }) => assert_eq!((aggregate, found_type.as_str()), (contested, "account")),
        other => panic!("expected IdTaken, got {other:?}"),
    }
    assert_eq!(versions(store, contested).await, [1]);
    assert!(store.history(other.id()).await.unwrap().is_empty());
}

pub async fn load_twice_in_one_context(store: &Store) {
    let id = open_account(store, "alice", "Alice", 100).await;
    let mut ctx = store.begin();
    let mut first = ctx.load::<Account>(id).await.unwrap();
    ctx.apply(&mut first, Deposited { amount: 10 }).unwrap();

    // Another context commits in between: the second load still sees the version this context
    // started from, plus what it staged.
    store
        .transact(async |other| {
            let mut a = other.load::<Account>(id).await?;
            other.apply(&mut a, Deposited { amount: 1000 })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();

    let mut second = ctx.load_by_key::<Account>("alice").await.unwrap();
    assert_eq!((second.balance, second.version()), (110, 3));
    ctx.apply(&mut second, Deposited { amount: 1 }).unwrap();
    // The first root is behind now.
    match ctx.apply(&mut first, Deposited { amount: 1 }) {
        Err(Error::StaleRoot {
            root_version,
            context_version,
            ..
        }) => assert_eq!((root_version, context_version), (3, 4)),
        other => panic!("expected StaleRoot, got {other:?}"),
    }
    assert_eq!(ctx.staged_events(), 2);
    // The commit conflicts with the other context's commit, as any stale context would.
    assert!(matches!(ctx.commit().await, Err(Error::Conflict { .. })));

    // Without interference, both staged events land in order.
    let mut ctx = store.begin();
    let mut first = ctx.load::<Account>(id).await.unwrap();
    ctx.apply(&mut first, Deposited { amount: 1 }).unwrap();
    let mut second = ctx.load::<Account>(id).await.unwrap();
    ctx.apply(&mut second, Withdrawn { amount: 2 }).unwrap();
    ctx.commit().await.unwrap();
    assert_eq!(balance(store, "alice").await, (1099, 5));

    // A new aggregate loaded again by its key in the context that created it.
    let mut ctx = store.begin();
    let mut new = ctx.create_with_key::<Account>("erin").await.unwrap();
    ctx.apply(
        &mut new,
        Opened {
            owner: "Erin".into(),
        },
    )
    .unwrap();
    let again = ctx.load_by_key::<Account>("erin").await.unwrap();
    assert_eq!(
        (again.owner.as_str(), again.version(), again.id()),
        ("Erin", 1, new.id())
    );
    ctx.commit().await.unwrap();
}

pub async fn not_found_and_wrong_type(store: &Store) {
    let mut ctx = store.begin_read_only();
    let missing = AggregateId::new();
    match ctx.load::<Account>(missing).await {
        Err(Error::NotFound {
            aggregate_type,
            target,
        }) => {
            assert_eq!(aggregate_type, "account");
            assert_eq!(target, Target::Id(missing));
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    match ctx.load_by_key::<Account>("nobody").await {
        Err(Error::NotFound { target, .. }) => assert_eq!(target, Target::Key("nobody".into())),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let id = open_account(store, "alice", "Alice", 0).await;
    match ctx.load::<Counter>(id).await {
        Err(Error::WrongAggregateType {
            aggregate,
            expected,
            found,
        }) => {
            assert_eq!(aggregate, id);
            assert_eq!((expected.as_str(), found.as_str()), ("counter", "account"));
        }
        other => panic!("expected WrongAggregateType, got {other:?}"),
    }
    // Keys are per type: there is no counter "alice".
    assert!(ctx.find_by_key::<Counter>("alice").await.unwrap().is_none());
}

pub async fn read_only_context(store: &Store) {
    let id = open_account(store, "alice", "Alice", 50).await;
    let mut ctx = store.begin_read_only();
    assert!(ctx.is_read_only());
    let mut alice = ctx.load::<Account>(id).await.unwrap();
    assert_eq!(alice.balance, 50);
    assert!(matches!(
        ctx.apply(&mut alice, Deposited { amount: 1 }),
        Err(Error::ReadOnly)
    ));
    assert_eq!(
        (alice.balance, alice.version()),
        (50, 2),
        "the root is unchanged"
    );
    assert!(matches!(ctx.create::<Account>(), Err(Error::ReadOnly)));
    assert!(matches!(
        ctx.load_or_create_by_key::<Account>("zed").await,
        Err(Error::ReadOnly)
    ));
    ctx.commit().await.unwrap();
    assert_eq!(balance(store, "alice").await, (50, 2));
}

async fn tick(store: &Store, id: Option<AggregateId>, times: usize) -> AggregateId {
    store
        .transact(async |ctx| {
            let mut meter = match id {
                Some(id) => ctx.load::<Meter>(id).await?,
                None => ctx.create::<Meter>()?,
            };
            for _ in 0..times {
                ctx.apply(&mut meter, Ticked)?;
            }
            Ok::<_, Error>(meter.id())
        })
        .await
        .unwrap()
}

pub async fn snapshots_are_used(store: &Store) {
    let id = tick(store, None, 3).await;
    let meter = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!(
        (meter.ticks, meter.applied_since_load),
        (3, 3),
        "no snapshot yet"
    );

    tick(store, Some(id), 9).await; // versions 4..=12: snapshots staged at 5 and 10
    let meter = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!(meter.version(), 12);
    assert_eq!(meter.ticks, 12);
    assert_eq!(
        meter.applied_since_load, 2,
        "loaded from the snapshot at 10"
    );

    tick(store, Some(id), 3).await; // 13..=15: snapshot at 15
    let meter = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!((meter.ticks, meter.applied_since_load), (15, 0));

    // A context that loads twice reads the snapshot no newer than its starting version.
    let mut ctx = store.begin();
    let mut m = ctx.load::<Meter>(id).await.unwrap();
    ctx.apply(&mut m, Ticked).unwrap();
    let again = ctx.load::<Meter>(id).await.unwrap();
    assert_eq!((again.ticks, again.version()), (16, 16));
}

pub async fn snapshot_version_mismatch_rebuilds(store: &Store) {
    let id = tick(store, None, 12).await; // snapshots of shape 1 at 5 and 10
    let old = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!(old.applied_since_load, 2);

    // The next release ignores shape-1 snapshots and rebuilds from all 12 events.
    let next = store
        .begin_read_only()
        .load::<MeterNextRelease>(id)
        .await
        .unwrap();
    assert_eq!((next.inner.ticks, next.version()), (12, 12));
    assert_eq!(next.inner.applied_since_load, 12, "rebuilt from events");

    // It writes shape-2 snapshots of its own, which it then uses.
    store
        .transact(async |ctx| {
            let mut m = ctx.load::<MeterNextRelease>(id).await?;
            for _ in 0..3 {
                ctx.apply(&mut m, Ticked)?;
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    let next = store
        .begin_read_only()
        .load::<MeterNextRelease>(id)
        .await
        .unwrap();
    assert_eq!((next.inner.ticks, next.inner.applied_since_load), (15, 0));
    // And the old release still finds its own shape-1 snapshot at 10.
    let old = store.begin_read_only().load::<Meter>(id).await.unwrap();
    assert_eq!((old.ticks, old.applied_since_load), (15, 5));
}

pub async fn retry_helper_counts_to_400(store: &Store) {
    contended_increments(store, 8, 50).await;
}

/// `tasks` tasks each increment one counter `increments` times through the retry helper; the
/// counter ends at `tasks × increments` with versions 1..=N and no gap, and no conflict reaches
/// a caller.
pub async fn contended_increments(store: &Store, tasks: u64, increments: u64) {
    contended_increments_across(std::slice::from_ref(store), tasks, increments).await;
}

/// [`contended_increments`] with task `i` on `stores[i % stores.len()]`, handles on one store;
/// every handle then reads the same counter and versions.
pub async fn contended_increments_across(stores: &[Store], tasks: u64, increments: u64) {
    let Some(store) = stores.first() else {
        return;
    };
    let id = store
        .transact(async |ctx| {
            let mut c = ctx.create::<Counter>()?;
            ctx.apply(&mut c, CounterEvent::Reset(0))?;
            Ok::<_, Error>(c.id())
        })
        .await
        .unwrap();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let store = stores[task as usize % stores.len()].clone();
            tokio::spawn(async move {
                for _ in 0..increments {
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
        tokio::time::timeout(Duration::from_secs(600), handle)
            .await
            .expect("task finished in time")
            .expect("task did not panic")
            .expect("no error reached the caller");
    }
    for store in stores {
        let counter = store.begin_read_only().load::<Counter>(id).await.unwrap();
        assert_eq!(counter.value, tasks * increments);
        let expected: Vec<u64> = (1..=tasks * increments + 1).collect();
        assert_eq!(versions(store, id).await, expected, "versions with no gap");
    }
}

/// The versions in an aggregate's history, oldest first.
pub async fn versions(store: &Store, id: AggregateId) -> Vec<u64> {
    store
        .history(id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect()
}

/// Commits a deposit of 100 to `id` from another context.
async fn overtake(store: &Store, id: AggregateId) -> Result<(), Error> {
    store
        .transact(async |other| {
            let mut a = other.load::<Account>(id).await?;
            other.apply(&mut a, Deposited { amount: 100 })?;
            Ok::<_, Error>(())
        })
        .await
}

pub async fn retry_reruns_on_conflict_only(store: &Store) {
    let id = open_account(store, "alice", "Alice", 0).await;
    // Each attempt is overtaken by another commit between its load and its commit.
    let attempts = Cell::new(0);
    let result = store
        .transact_with_retry(Retry::attempts(3), async |ctx| {
            attempts.set(attempts.get() + 1);
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount: 1 })?;
            overtake(store, id).await?;
            Ok::<_, Error>(())
        })
        .await;
    assert!(matches!(result, Err(Error::Conflict { .. })));
    assert_eq!(
        attempts.get(),
        3,
        "three attempts, then the conflict reaches the caller"
    );
    assert_eq!(balance(store, "alice").await, (300, 4));

    // Overtaken once, then it commits.
    let attempts = Cell::new(0);
    store
        .transact_with_retry(Retry::attempts(3), async |ctx| {
            attempts.set(attempts.get() + 1);
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount: 1 })?;
            if attempts.get() == 1 {
                overtake(store, id).await?;
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(attempts.get(), 2);
    assert_eq!(balance(store, "alice").await, (401, 6));

    // A domain error is not retried.
    let attempts = Cell::new(0);
    let result = store
        .transact_with_retry(Retry::attempts(5), async |ctx| {
            attempts.set(attempts.get() + 1);
            let a = ctx.load::<Account>(id).await?;
            a.withdraw(10_000)?;
            Ok::<_, BankError>(())
        })
        .await;
    assert!(matches!(result, Err(BankError::Overdrawn { .. })));
    assert_eq!(attempts.get(), 1);
}

/// Moves `amount` between two accounts: the helper a web handler calls, with borrowed arguments
/// that the retried closure captures by reference.
pub async fn transfer(store: &Store, from: &str, to: &str, amount: i64) -> Result<(), BankError> {
    store
        .transact_with_retry(Retry::attempts(1_000), async |ctx| {
            let mut from = ctx.load_by_key::<Account>(from).await?;
            let mut to = ctx.load_by_key::<Account>(to).await?;
            let withdrawn = from.withdraw(amount)?;
            ctx.apply(&mut from, withdrawn)?;
            ctx.apply(&mut to, Deposited { amount })?;
            Ok(())
        })
        .await
}

/// Opens the account `key` with a deposit, through `transact` with a borrowed key.
async fn open_with_deposit(store: &Store, key: &str, amount: i64) -> Result<(), BankError> {
    store
        .transact(async move |ctx| {
            let mut account = ctx.create_with_key::<Account>(key).await?;
            ctx.apply(
                &mut account,
                Opened {
                    owner: key.to_owned(),
                },
            )?;
            ctx.apply(&mut account, Deposited { amount })?;
            Ok(())
        })
        .await
}

pub async fn helpers_with_borrowed_arguments_run_in_spawned_tasks(store: &Store) {
    const TASKS: usize = 16;
    let keys = ["a", "b", "c", "d"];
    for key in keys {
        open_account(store, key, key, 1_000).await;
    }
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = store.clone();
            let from = keys[i % keys.len()].to_owned();
            let to = keys[(i + 1) % keys.len()].to_owned();
            // `tokio::spawn` needs the helpers' futures to be `Send`.
            let own = format!("own {i}");
            tokio::spawn(async move {
                transfer(&store, &from, &to, 7).await?;
                open_with_deposit(&store, &own, 1).await
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("task finished in time")
            .expect("task did not panic")
            .expect("transfer and deposit succeeded");
    }
    let mut total = 0;
    let mut events = 0;
    for key in keys {
        let (balance, version) = balance(store, key).await;
        total += balance;
        events += version;
    }
    assert_eq!(total, 4 * 1_000, "transfers move money, they make none");
    // 2 events per opened account, 2 per transfer.
    assert_eq!(events, 4 * 2 + TASKS as u64 * 2);
    for i in 0..TASKS {
        assert_eq!(balance(store, &format!("own {i}")).await, (1, 2));
    }
}

pub async fn feed_each_event_once_in_commit_order(store: &Store) {
    let mut expected: Vec<(AggregateId, u64)> = Vec::new();
    let alice = open_account(store, "alice", "Alice", 10).await;
    expected.extend([(alice, 1), (alice, 2)]);
    let bob = open_account(store, "bob", "Bob", 0).await;
    expected.push((bob, 1));
    for round in 0..5u64 {
        store
            .transact(async |ctx| {
                let mut b = ctx.load::<Account>(bob).await?;
                let mut a = ctx.load::<Account>(alice).await?;
                ctx.apply(&mut b, Deposited { amount: 1 })?;
                ctx.apply(&mut a, Deposited { amount: 1 })?;
                ctx.apply(&mut b, Deposited { amount: 1 })?;
                Ok::<_, Error>(())
            })
            .await
            .unwrap();
        expected.extend([
            (bob, 2 + 2 * round),
            (alice, 3 + round),
            (bob, 3 + 2 * round),
        ]);
    }

    // Read in small pages to exercise the cursor.
    let read = read_feed_to_end(store, FeedCursor::START, 4).await;
    let cursor = read.last().unwrap().cursor;
    // Commits keep their order, and the events of one commit the order they were applied in,
    // across aggregates.
    let got: Vec<(AggregateId, u64)> = read.iter().map(|e| (e.aggregate_id, e.version)).collect();
    assert_eq!(got, expected);
    let mut seen = HashSet::new();
    for e in &read {
        assert!(seen.insert(e.event_id), "each event once");
    }
    let positions: Vec<u64> = read.iter().map(|e| e.position()).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions increase"
    );
    let mut last_version: HashMap<AggregateId, u64> = HashMap::new();
    for (a, v) in &got {
        let prev = last_version.insert(*a, *v).unwrap_or(0);
        assert_eq!(*v, prev + 1, "each aggregate's events in version order");
    }
    // Reading on from the end gives nothing.
    assert!(read_feed_to_end(store, cursor, 10).await.is_empty());
    // A waiter with events to read returns at once, whatever its timeout.
    assert!(
        store
            .wait_for_events(FeedCursor::START, Duration::MAX)
            .await
            .unwrap()
    );
}

/// Waits until every partition of the subscription `name` has nothing left to deliver and
/// nothing holds the feed back, failing instead of hanging.
pub async fn until_caught_up(store: &Store, name: &str, what: &str) {
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let status = store.subscriptions().status(name).await.unwrap();
            if status
                .iter()
                .all(|s| s.lag.events == 0 && s.lag.held_back.is_none())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: subscription {name:?} did not catch up"));
}

/// Reads the events after `cursor` that pass `filter`, in pages of `page`, until caught up (a
/// short page that nothing holds back); returns them and the last `scanned` cursor.
pub async fn read_matching_to_end(
    store: &Store,
    mut cursor: FeedCursor,
    page: usize,
    filter: &annals::Filter,
) -> (Vec<RecordedEvent>, FeedCursor) {
    let mut read = Vec::new();
    let mut held_since: Option<std::time::Instant> = None;
    loop {
        let events = store
            .read_feed_matching(cursor, page, filter)
            .await
            .expect("read feed");
        assert!(events.len() <= page, "a page holds at most its limit");
        assert!(
            events.scanned >= cursor,
            "the scanned cursor never goes back"
        );
        if let Some(last) = events.last() {
            assert!(events.scanned >= last.cursor, "scanned covers the page");
        }
        cursor = events.scanned;
        let short = events.len() < page;
        let held = events.held_back.clone();
        read.extend(events);
        match (short, held) {
            (false, _) => held_since = None,
            (true, None) => return (read, cursor),
            (true, Some(held)) => {
                let since = *held_since.get_or_insert_with(std::time::Instant::now);
                assert!(
                    since.elapsed() < std::time::Duration::from_secs(120),
                    "the feed stayed {held}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// The events of the feed after `cursor` that pass `keep`, judged by the test.
async fn feed_where(
    store: &Store,
    keep: impl Fn(&RecordedEvent) -> bool,
) -> Vec<(AggregateId, u64, String)> {
    read_feed_to_end(store, FeedCursor::START, 100)
        .await
        .into_iter()
        .filter(|e| keep(e))
        .map(|e| (e.aggregate_id, e.version, e.event_type))
        .collect()
}

fn summary(events: &[RecordedEvent]) -> Vec<(AggregateId, u64, String)> {
    events
        .iter()
        .map(|e| (e.aggregate_id, e.version, e.event_type.clone()))
        .collect()
}

pub async fn filtered_feed_reads_only_what_matches(store: &Store) {
    use annals::Filter;
    let alice = open_account(store, "alice", "Alice", 10).await;
    let bob = open_account(store, "bob", "Bob", 5).await;
    for round in 0..4u64 {
        store
            .transact(async |ctx| {
                let mut a = ctx.load::<Account>(alice).await?;
                let mut b = ctx.load::<Account>(bob).await?;
                let mut c = ctx.create::<Counter>()?;
                ctx.apply(&mut a, Deposited { amount: 1 })?;
                ctx.apply(&mut c, CounterEvent::Added { by: round })?;
                if round % 2 == 0 {
                    ctx.apply(&mut b, Withdrawn { amount: 1 })?;
                }
                ctx.apply(&mut c, CounterEvent::Incremented)?;
                Ok::<_, Error>(())
            })
            .await
            .unwrap();
    }
    let everything = read_feed_to_end(store, FeedCursor::START, 100).await;
    let head = everything.last().unwrap().cursor;

    type Keep = Box<dyn Fn(&RecordedEvent) -> bool>;
    let cases: Vec<(Filter, Keep)> = vec![
        (
            Filter::all().event::<Deposited>(),
            Box::new(|e| e.event_type == "account.deposited"),
        ),
        (
            Filter::all().event::<CounterEvent>(),
            Box::new(|e| e.event_type.starts_with("counter.") || e.event_type == "Reset"),
        ),
        (
            Filter::all().aggregate_type::<Counter>(),
            Box::new(|e| e.aggregate_type == "counter"),
        ),
        (
            Filter::all()
                .aggregate_type::<Account>()
                .event::<Deposited>()
                .event::<Withdrawn>(),
            Box::new(|e| {
                e.aggregate_type == "account"
                    && ["account.deposited", "account.withdrawn"].contains(&e.event_type.as_str())
            }),
        ),
        (
            Filter::all().key::<Account>("alice"),
            Box::new(move |e| e.aggregate_id == alice),
        ),
        (
            Filter::all().aggregate(bob),
            Box::new(move |e| e.aggregate_id == bob),
        ),
        (
            Filter::all().aggregate(bob).event::<Withdrawn>(),
            Box::new(move |e| e.aggregate_id == bob && e.event_type == "account.withdrawn"),
        ),
    ];
    for (filter, keep) in cases {
        let expected = feed_where(store, keep).await;
        assert!(!expected.is_empty(), "{filter:?} matches something");
        for page in [1, 2, 100] {
            let (read, scanned) =
                read_matching_to_end(store, FeedCursor::START, page, &filter).await;
            assert_eq!(summary(&read), expected, "{filter:?} in pages of {page}");
            assert_eq!(scanned, head, "{filter:?}: the reader moved to the head");
        }
    }

    // A filter nothing matches reads nothing and still moves past everything.
    for filter in [
        Filter::all().event_named("no.such.event"),
        Filter::all().key::<Account>("carol"),
        Filter::all().aggregate_type_named("no.such.aggregate"),
    ] {
        let page = store
            .read_feed_matching(FeedCursor::START, 10, &filter)
            .await
            .unwrap();
        assert!(page.is_empty(), "{filter:?}");
        if page.held_back.is_none() {
            assert_eq!(page.scanned, head, "{filter:?}");
        }
    }
    // From the head there is nothing, and the cursor stays.
    let page = store
        .read_feed_matching(head, 10, &Filter::all().event::<Deposited>())
        .await
        .unwrap();
    assert!(page.is_empty());
    assert_eq!(page.scanned, head);
    // The unfiltered read through the same call is the plain feed.
    let (all, _) = read_matching_to_end(store, FeedCursor::START, 7, &Filter::all()).await;
    assert_eq!(summary(&all), summary(&everything));
    // A key needs its one aggregate type.
    let bad = Filter::all()
        .key::<Account>("alice")
        .aggregate_type::<Counter>();
    assert!(matches!(
        store.read_feed_matching(FeedCursor::START, 10, &bad).await,
        Err(Error::Config(_))
    ));
}

pub async fn follow_catches_up_then_tails(store: &Store) {
    use annals::Filter;
    use futures_util::StreamExt;
    let alice = open_account(store, "alice", "Alice", 10).await;
    let filter = Filter::all().event::<Deposited>();
    let mut deposits = store.follow(FeedCursor::START, filter);
    let first = tokio::time::timeout(Duration::from_secs(60), deposits.next())
        .await
        .expect("the stored deposit arrives")
        .expect("the stream goes on")
        .unwrap();
    assert_eq!((first.aggregate_id, first.version), (alice, 2));

    // Later commits arrive as they are made: only deposits, in order.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for amount in 1..=5 {
                store
                    .transact(async move |ctx| {
                        let mut a = ctx.load::<Account>(alice).await?;
                        ctx.apply(&mut a, Withdrawn { amount: 1 })?;
                        ctx.apply(&mut a, Deposited { amount })?;
                        Ok::<_, Error>(())
                    })
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut amounts = Vec::new();
    while amounts.len() < 5 {
        let event = tokio::time::timeout(Duration::from_secs(60), deposits.next())
            .await
            .expect("each new deposit arrives")
            .expect("the stream goes on")
            .unwrap();
        let deposit = event.decode::<Deposited>().unwrap().expect("only deposits");
        amounts.push(deposit.amount);
    }
    assert_eq!(amounts, [1, 2, 3, 4, 5]);
    writer.await.unwrap();
}

/// Reads the feed after `cursor` in pages of `page` until it is caught up: a short page that
/// nothing holds back. While a transaction holds events back (PostgreSQL: any transaction of
/// the database, such as another test's), it reads again until the hold-back ends; it fails
/// after two minutes of hold-back, naming the holder.
pub async fn read_feed_to_end(
    store: &Store,
    mut cursor: FeedCursor,
    page: usize,
) -> Vec<RecordedEvent> {
    let mut read = Vec::new();
    let mut held_since: Option<std::time::Instant> = None;
    loop {
        let events = store.read_feed(cursor, page).await.expect("read feed");
        assert!(events.len() <= page, "a page holds at most its limit");
        cursor = events.cursor_or(cursor);
        let short = events.len() < page;
        let held = events.held_back.clone();
        read.extend(events);
        match (short, held) {
            (false, _) => held_since = None,
            (true, None) => return read,
            (true, Some(held)) => {
                let since = *held_since.get_or_insert_with(std::time::Instant::now);
                assert!(
                    since.elapsed() < std::time::Duration::from_secs(120),
                    "the feed stayed {held}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

pub async fn payload_too_large_is_refused(store: &Store) {
    let max = store.options().max_payload_bytes;
    let mut ctx = store.begin();
    let mut blob = ctx.create::<Blob>().unwrap();
    ctx.apply(
        &mut blob,
        BlobWritten {
            data: "small".into(),
        },
    )
    .unwrap();
    let big = "x".repeat(max + 1);
    match ctx.apply(&mut blob, BlobWritten { data: big }) {
        Err(Error::PayloadTooLarge {
            what,
            type_name,
            size,
            max: limit,
        }) => {
            assert_eq!(
                (what, type_name.as_str(), limit),
                ("event", "blob.written", max)
            );
            assert!(size > max);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!((blob.data.as_str(), blob.version()), ("small", 1));
    assert_eq!(ctx.staged_events(), 1);
    let id = blob.id();
    ctx.commit().await.unwrap();
    let blob = store.begin_read_only().load::<Blob>(id).await.unwrap();
    assert_eq!((blob.data.as_str(), blob.version()), ("small", 1));
}

/// Needs a store opened with a small [`StoreOptions::max_commit_bytes`] (under 64 KiB).
pub async fn commit_too_large_is_refused(store: &Store) {
    let max = store.options().max_commit_bytes;
    assert!(
        max < 64 << 10,
        "open the store with a small max_commit_bytes"
    );
    let chunk = "x".repeat(max / 4);
    let mut ctx = store.begin();
    let mut blob = ctx.create::<Blob>().unwrap();
    for _ in 0..5 {
        ctx.apply(
            &mut blob,
            BlobWritten {
                data: chunk.clone(),
            },
        )
        .unwrap();
    }
    let id = blob.id();
    match ctx.commit().await {
        Err(Error::CommitTooLarge { size, max: limit }) => {
            assert_eq!(limit, max);
            assert!(size > max, "{size} > {max}");
        }
        other => panic!("expected CommitTooLarge, got {other:?}"),
    }
    assert!(matches!(
        store.begin_read_only().load::<Blob>(id).await,
        Err(Error::NotFound { .. })
    ));
    // Under the limit, the same store commits.
    let id = store
        .transact(async |ctx| {
            let mut blob = ctx.create::<Blob>()?;
            ctx.apply(
                &mut blob,
                BlobWritten {
                    data: chunk.clone(),
                },
            )?;
            ctx.apply(
                &mut blob,
                BlobWritten {
                    data: chunk.clone(),
                },
            )?;
            Ok::<_, Error>(blob.id())
        })
        .await
        .unwrap();
    let blob = store.begin_read_only().load::<Blob>(id).await.unwrap();
    assert_eq!(blob.version(), 2);
}

pub async fn odd_payloads_round_trip(store: &Store) {
    let odd = "nul \u{0} escaped \\u0000 quote \" backslash \\ emoji 🦀 newline \n end".to_owned();
    let id = store
        .transact(async |ctx| {
            let mut blob = ctx.create_with_key::<Blob>("clé ünïcode 🦀").await?;
            ctx.apply(&mut blob, BlobWritten { data: odd.clone() })?;
            Ok::<_, Error>(blob.id())
        })
        .await
        .unwrap();
    let mut ctx = store.begin_read_only();
    let blob = ctx.load::<Blob>(id).await.unwrap();
    assert_eq!(blob.data, odd);
    let by_key = ctx.load_by_key::<Blob>("clé ünïcode 🦀").await.unwrap();
    assert_eq!(by_key.id(), id);
    for bad in ["", "nul \u{0} inside", &"k".repeat(1025)] {
        assert!(matches!(
            ctx.find_by_key::<Blob>(bad).await,
            Err(Error::InvalidKey { .. })
        ));
    }
}

pub async fn apply_applies_what_reads_back(store: &Store) {
    let mut ctx = store.begin();
    let mut rating = ctx.create::<Rating>().unwrap();
    ctx.apply(&mut rating, Rated { rate: 4.5 }).unwrap();
    // NaN encodes as `null`, which does not decode into an f64: refused, nothing staged.
    match ctx.apply(&mut rating, Rated { rate: f64::NAN }) {
        Err(Error::RoundTrip { type_name, .. }) => assert_eq!(type_name, "rating.rated"),
        other => panic!("expected RoundTrip, got {other:?}"),
    }
    match ctx.apply(&mut rating, Hidden { secret: "s".into() }) {
        Err(Error::RoundTrip { type_name, .. }) => assert_eq!(type_name, "rating.hidden"),
        other => panic!("expected RoundTrip, got {other:?}"),
    }
    assert_eq!((rating.version(), ctx.staged_events()), (1, 1));
    assert_eq!(rating.rates, [4.5]);
    // A field skipped when serializing reads back as its default: that is what is applied.
    ctx.apply(
        &mut rating,
        Noted {
            text: "kept".into(),
            draft: "lost".into(),
        },
    )
    .unwrap();
    assert_eq!(rating.notes, [("kept".to_owned(), String::new())]);
    let id = rating.id();
    let in_memory = rating.into_state();
    ctx.commit().await.unwrap();
    let loaded = store.begin_read_only().load::<Rating>(id).await.unwrap();
    assert_eq!(loaded.version(), 2);
    assert_eq!(
        *loaded.state(),
        in_memory,
        "a load rebuilds the state apply made"
    );
}

pub async fn snapshot_that_does_not_encode_is_an_error(store: &Store) {
    let mut ctx = store.begin();
    let mut grid = ctx.create::<Grid>().unwrap();
    ctx.apply(&mut grid, Marked { x: 1, y: 2 }).unwrap();
    // The second event fires the snapshot policy; a map with tuple keys is no JSON object.
    match ctx.apply(&mut grid, Marked { x: 3, y: 4 }) {
        Err(Error::Encode {
            what, type_name, ..
        }) => assert_eq!((what, type_name.as_str()), ("snapshot", "grid")),
        other => panic!("expected a snapshot Encode error, got {other:?}"),
    }
    assert_eq!(ctx.staged_events(), 1, "the event was not staged");
    // The root holds the refused event, so it may not stage more.
    assert!(matches!(
        ctx.apply(&mut grid, Marked { x: 5, y: 6 }),
        Err(Error::StaleRoot { .. })
    ));
    // Loaded again in the context, it is back at what was staged.
    let mut again = ctx.load::<Grid>(grid.id()).await.unwrap();
    assert_eq!((again.version(), again.cells.len()), (1, 1));
    assert!(matches!(
        ctx.apply(&mut again, Marked { x: 7, y: 8 }),
        Err(Error::Encode {
            what: "snapshot",
            ..
        })
    ));
    let id = grid.id();
    ctx.commit().await.unwrap();
    assert_eq!(versions(store, id).await, [1]);
}

pub async fn enum_events_store_the_variant_content(store: &Store) {
    let id = store
        .transact(async |ctx| {
            let mut c = ctx.create::<Counter>()?;
            ctx.apply(&mut c, CounterEvent::Added { by: 10 })?;
            ctx.apply(&mut c, CounterEvent::Reset(3))?;
            ctx.apply(&mut c, CounterEvent::Incremented)?;
            Ok::<_, Error>(c.id())
        })
        .await
        .unwrap();
    let history = store.history(id).await.unwrap();
    let stored: Vec<(&str, serde_json::Value)> = history
        .iter()
        .map(|e| (e.event_type.as_str(), e.payload_json().unwrap()))
        .collect();
    assert_eq!(
        stored,
        [
            ("counter.added", serde_json::json!({ "by": 10 })),
            ("Reset", serde_json::json!(3)),
            ("counter.incremented", serde_json::Value::Null),
        ],
        "only the variant's content is stored; the name says which variant"
    );
    let counter = store.begin_read_only().load::<Counter>(id).await.unwrap();
    assert_eq!((counter.value, counter.version()), (4, 3));
}

pub async fn wait_for_events_takes_any_timeout(store: &Store) {
    // Nothing yet: a zero timeout answers at once.
    assert!(
        !store
            .wait_for_events(FeedCursor::START, Duration::ZERO)
            .await
            .unwrap()
    );
    // A waiter without a limit (a timeout that is no point in time) wakes on the next commit.
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .wait_for_events(FeedCursor::START, Duration::MAX)
                .await
        })
    };
    open_account(store, "alice", "Alice", 0).await;
    let woke = tokio::time::timeout(Duration::from_secs(60), waiter)
        .await
        .expect("the waiter woke in time")
        .expect("the waiter did not panic")
        .unwrap();
    assert!(woke);
    assert!(
        store
            .wait_for_events(FeedCursor::START, Duration::MAX)
            .await
            .unwrap()
    );
    let last = store.read_feed(FeedCursor::START, 10).await.unwrap();
    let cursor = last.last().unwrap().cursor;
    assert!(
        !store
            .wait_for_events(cursor, Duration::from_millis(1))
            .await
            .unwrap()
    );
}
