//! The aggregate cache on every store: loads through a handle with a cache see every commit, of
//! this handle or another, and never a commit that failed.
//!
//! Each case takes two handles on one store: `cached`, opened with
//! `StoreOptions::aggregate_cache(CAPACITY)`, and `other`, a second handle on the same data (a
//! second `Store::open` on SQL stores; on the in-memory store, which one handle owns, a clone of
//! `cached`).

use annals::Error;
use annals::prelude::*;

use super::domain::*;
use super::open_account;

/// The capacity the `cached` handle is opened with.
pub const CAPACITY: usize = 8;

/// Generates one `#[tokio::test]` per cache case. `$open` is an async expression that yields
/// `Option<(Store, Store, guard)>`: the cached handle, the other handle and what must stay
/// alive, or `None` to skip.
#[macro_export]
macro_rules! cache_suite {
    (attributes = $attrs:tt, $open:expr) => {
        $crate::cache_suite!(@cases $attrs $open;
            loads_see_commits_of_another_handle,
            a_conflict_leaves_no_trace_in_the_cache,
            a_failed_closure_leaves_no_trace_in_the_cache,
            contended_increments_from_two_handles,
            the_cache_holds_at_most_its_capacity,
            pruned_and_erased_aggregates_are_not_served_from_the_cache,
        );
    };
    (@cases $attrs:tt $open:expr; $($case:ident),* $(,)?) => {
        $(
            $crate::cache_suite!(@case $attrs $open; $case);
        )*
    };
    (@case [$(#[$attr:meta])*] $open:expr; $case:ident) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some((cached, other, _guard)) = $open.await else {
                return;
            };
            $crate::conformance::cache::$case(&cached, &other).await;
            cached.close().await;
            other.close().await;
        }
    };
}

/// The account `key` as `store` loads it: balance and version.
async fn balance(store: &Store, key: &str) -> (i64, u64) {
    let account = store
        .begin_read_only()
        .load_by_key::<Account>(key)
        .await
        .expect("load account");
    (account.balance, account.version())
}

/// Deposits `amount` into `key` through `store`.
async fn deposit(store: &Store, key: &str, amount: i64) -> Result<(), Error> {
    store
        .transact(async |ctx| {
            let mut a = ctx.load_by_key::<Account>(key).await?;
            ctx.apply(&mut a, Deposited { amount })?;
            Ok::<_, Error>(())
        })
        .await
}

pub async fn loads_see_commits_of_another_handle(cached: &Store, other: &Store) {
    let id = open_account(cached, "alice", "Alice", 100).await;
    assert_eq!(cached.cached_aggregates(), 1, "the commit filled the cache");
    assert_eq!(balance(cached, "alice").await, (100, 2));

    // The other handle commits twice; the cached handle's loads see both, by key and by id.
    deposit(other, "alice", 10).await.unwrap();
    deposit(other, "alice", 20).await.unwrap();
    assert_eq!(balance(cached, "alice").await, (130, 4));
    let by_id = cached.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((by_id.owner.as_str(), by_id.balance), ("Alice", 130));

    // A commit through the cached handle builds on what it loaded, and both handles agree.
    deposit(cached, "alice", 1).await.unwrap();
    deposit(other, "alice", 2).await.unwrap();
    deposit(cached, "alice", 3).await.unwrap();
    assert_eq!(balance(cached, "alice").await, (136, 7));
    assert_eq!(balance(other, "alice").await, (136, 7));
    let history = cached.history(id).await.unwrap();
    assert_eq!(history.len(), 7);
}

pub async fn a_conflict_leaves_no_trace_in_the_cache(cached: &Store, other: &Store) {
    open_account(cached, "bob", "Bob", 50).await;
    let mut ctx = cached.begin();
    let mut bob = ctx.load_by_key::<Account>("bob").await.unwrap();
    ctx.apply(&mut bob, Withdrawn { amount: 40 }).unwrap();

    // Another commit lands first, at the version this context would write.
    deposit(other, "bob", 7).await.unwrap();
    match ctx.commit().await {
        Err(Error::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (2, 3)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The withdrawal was never committed: no load through either handle shows it.
    assert_eq!(balance(cached, "bob").await, (57, 3));
    assert_eq!(balance(other, "bob").await, (57, 3));

    // The next commit through the cached handle starts from the committed state.
    deposit(cached, "bob", 1).await.unwrap();
    assert_eq!(balance(other, "bob").await, (58, 4));
    assert_eq!(balance(cached, "bob").await, (58, 4));
}

pub async fn a_failed_closure_leaves_no_trace_in_the_cache(cached: &Store, other: &Store) {
    open_account(cached, "carol", "Carol", 10).await;
    assert_eq!(balance(cached, "carol").await, (10, 2));
    let failed: Result<(), Error> = cached
        .transact(async |ctx| {
            let mut c = ctx.load_by_key::<Account>("carol").await?;
            ctx.apply(&mut c, Deposited { amount: 1_000 })?;
            Err(Error::Config("the closure fails after applying".to_owned()))
        })
        .await;
    assert!(matches!(failed, Err(Error::Config(_))));
    // A context dropped after applying writes nothing, to the store or the cache.
    let mut dropped = cached.begin();
    let mut c = dropped.load_by_key::<Account>("carol").await.unwrap();
    dropped.apply(&mut c, Deposited { amount: 2_000 }).unwrap();
    drop(dropped);
    assert_eq!(balance(cached, "carol").await, (10, 2));

    // Had the cache kept one of them at version 3, this commit from the other handle (also
    // version 3) would be hidden behind it.
    deposit(other, "carol", 5).await.unwrap();
    assert_eq!(balance(cached, "carol").await, (15, 3));
}

pub async fn contended_increments_from_two_handles(cached: &Store, other: &Store) {
    super::contended_increments_across(&[cached.clone(), other.clone()], 6, 25).await;
}

pub async fn the_cache_holds_at_most_its_capacity(cached: &Store, other: &Store) {
    let keys: Vec<String> = (0..3 * CAPACITY).map(|i| format!("k{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        open_account(cached, key, "Kim", i as i64 + 1).await;
    }
    for round in 0..3 {
        for (i, key) in keys.iter().enumerate() {
            let expected = i as i64 + 1 + round;
            assert_eq!(balance(cached, key).await, (expected, 2 + round as u64));
            assert!(cached.cached_aggregates() <= CAPACITY);
            deposit(other, key, 1).await.unwrap();
        }
    }
    assert!(cached.cached_aggregates() > 0);
    cached.clear_aggregate_cache();
    assert_eq!(cached.cached_aggregates(), 0);
    assert_eq!(balance(cached, "k0").await, (4, 5));
}

/// Reads `value` into gauge `id` through `store`, in a commit of its own (each fifth writes a
/// snapshot).
async fn read_gauge(store: &Store, id: AggregateId, value: i64) {
    store
        .transact(async |ctx| {
            let mut gauge = ctx.load::<Gauge>(id).await?;
            ctx.apply(&mut gauge, GaugeRead { value })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
}

pub async fn pruned_and_erased_aggregates_are_not_served_from_the_cache(
    cached: &Store,
    other: &Store,
) {
    let mut ctx = cached.begin();
    let mut gauge = ctx.create::<Gauge>().unwrap();
    let id = gauge.id();
    for value in 1..=3 {
        ctx.apply(&mut gauge, GaugeRead { value }).unwrap();
    }
    ctx.commit().await.unwrap();
    assert_eq!(cached.cached_aggregates(), 1);

    // The other handle moves the gauge past two snapshots and prunes what they cover: the
    // events after the cached version 3 are gone up to 10.
    for value in 4..=12 {
        read_gauge(other, id, value).await;
    }
    assert_eq!(other.prune_events(id).await.unwrap(), 10);
    let gauge = cached.begin_read_only().load::<Gauge>(id).await.unwrap();
    assert_eq!((gauge.sum, gauge.reads, gauge.version()), (78, 12, 12));

    // Erased through the other handle: the cached handle does not find it.
    other.erase(id, Metadata::new()).await.unwrap();
    assert!(matches!(
        cached.begin_read_only().load::<Gauge>(id).await,
        Err(Error::NotFound { .. })
    ));
}
