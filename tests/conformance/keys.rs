//! Natural keys that change, on every store: set and released with the aggregate's events,
//! unique when contexts change them at once, compared byte for byte, and bounded in length.

use std::sync::Arc;

use annals::prelude::*;
use annals::{Error, Target};
use tokio::sync::Barrier;

use super::domain::*;

async fn account(store: &Store, key: &str) -> AggregateId {
    super::open_account(store, key, key, 0).await
}

fn key_taken(result: Result<(), Error>, key: &str) {
    match result {
        Err(Error::KeyTaken { key: taken, .. }) => assert_eq!(taken, key),
        other => panic!("expected KeyTaken for {key:?}, got {other:?}"),
    }
}

pub async fn keys_change_and_are_released(store: &Store) {
    let ann = account(store, "ann").await;

    // A change of key commits with the aggregate's event.
    let mut ctx = store.begin();
    let mut a = ctx.load_by_key::<Account>("ann").await.unwrap();
    ctx.apply(&mut a, Deposited { amount: 5 }).unwrap();
    ctx.change_key(&mut a, "ann.smith").unwrap();
    assert_eq!(a.key(), Some("ann.smith"));
    // Within the context, the aggregate is found by its new key only.
    assert!(ctx.find_by_key::<Account>("ann").await.unwrap().is_none());
    let again = ctx.load_by_key::<Account>("ann.smith").await.unwrap();
    assert_eq!((again.id(), again.balance), (ann, 5));
    ctx.commit().await.unwrap();

    let mut read = store.begin_read_only();
    assert!(read.find_by_key::<Account>("ann").await.unwrap().is_none());
    let a = read.load_by_key::<Account>("ann.smith").await.unwrap();
    assert_eq!((a.id(), a.version(), a.key()), (ann, 2, Some("ann.smith")));

    // The old key is free for another aggregate.
    let other = account(store, "ann").await;
    assert_ne!(other, ann);

    // A release: the aggregate lives on without a key, found by id.
    let mut ctx = store.begin();
    let mut a = ctx.load::<Account>(ann).await.unwrap();
    ctx.apply(&mut a, Withdrawn { amount: 1 }).unwrap();
    ctx.release_key(&mut a).unwrap();
    ctx.commit().await.unwrap();
    let mut read = store.begin_read_only();
    assert!(
        read.find_by_key::<Account>("ann.smith")
            .await
            .unwrap()
            .is_none()
    );
    let a = read.load::<Account>(ann).await.unwrap();
    assert_eq!((a.key(), a.balance, a.version()), (None, 4, 3));
    account(store, "ann.smith").await;

    // A key change without an event of its own commits too, under the version check.
    let mut ctx = store.begin();
    let mut a = ctx.load::<Account>(ann).await.unwrap();
    ctx.change_key(&mut a, "ann.s").unwrap();
    ctx.commit().await.unwrap();
    let a = store
        .begin_read_only()
        .load_by_key::<Account>("ann.s")
        .await
        .unwrap();
    assert_eq!((a.id(), a.version()), (ann, 3));
}

pub async fn a_taken_key_fails_the_commit_and_writes_nothing(store: &Store) {
    let ann = account(store, "ann").await;
    account(store, "bob").await;
    let mut ctx = store.begin();
    let mut a = ctx.load::<Account>(ann).await.unwrap();
    ctx.apply(&mut a, Deposited { amount: 5 }).unwrap();
    ctx.change_key(&mut a, "bob").unwrap();
    key_taken(ctx.commit().await.map(drop), "bob");
    let a = store.begin_read_only().load::<Account>(ann).await.unwrap();
    assert_eq!(
        (a.key(), a.version()),
        (Some("ann"), 1),
        "nothing was written"
    );

    // Taken by an aggregate of this context: refused at once.
    let mut ctx = store.begin();
    let mut a = ctx.load::<Account>(ann).await.unwrap();
    ctx.load_by_key::<Account>("bob").await.unwrap();
    key_taken(ctx.change_key(&mut a, "bob"), "bob");

    // Two aggregates trade keys in one commit.
    let mut ctx = store.begin();
    let mut a = ctx.load_by_key::<Account>("ann").await.unwrap();
    let mut b = ctx.load_by_key::<Account>("bob").await.unwrap();
    let bob = b.id();
    ctx.release_key(&mut b).unwrap();
    ctx.change_key(&mut a, "bob").unwrap();
    ctx.change_key(&mut b, "ann").unwrap();
    ctx.apply(&mut a, Deposited { amount: 1 }).unwrap();
    ctx.apply(&mut b, Deposited { amount: 1 }).unwrap();
    ctx.commit().await.unwrap();
    let mut read = store.begin_read_only();
    assert_eq!(read.load_by_key::<Account>("bob").await.unwrap().id(), ann);
    assert_eq!(read.load_by_key::<Account>("ann").await.unwrap().id(), bob);
}

pub async fn key_changes_stay_unique_under_concurrency(store: &Store) {
    // Rounds of two tasks that give two aggregates one new key at once: one wins.
    for round in 0..10 {
        let ids = [
            account(store, &format!("r{round}.a")).await,
            account(store, &format!("r{round}.b")).await,
        ];
        let wanted = format!("r{round}.shared");
        let barrier = Arc::new(Barrier::new(2));
        let tasks: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let (store, barrier, wanted) = (store.clone(), barrier.clone(), wanted.clone());
                tokio::spawn(async move {
                    let mut ctx = store.begin();
                    let mut a = ctx.load::<Account>(id).await?;
                    ctx.apply(&mut a, Deposited { amount: 1 })?;
                    ctx.change_key(&mut a, &wanted)?;
                    barrier.wait().await;
                    ctx.commit().await.map(|_| id)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), task)
                .await
                .expect("the commit ends");
            match outcome.unwrap() {
                Ok(id) => winners.push(id),
                Err(Error::KeyTaken { key, .. }) => assert_eq!(key, wanted),
                Err(e) if e.is_conflict() => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one takes the key");
        let holder = store
            .begin_read_only()
            .load_by_key::<Account>(&wanted)
            .await
            .unwrap();
        assert_eq!(holder.id(), winners[0]);
        assert_eq!(holder.version(), 2, "the loser wrote nothing");
    }
}

pub async fn keys_are_bytes_and_bounded(store: &Store) {
    // Compared byte for byte: these are three keys.
    for key in ["Ann", "ann", "ann "] {
        account(store, key).await;
    }
    let mut read = store.begin_read_only();
    assert_eq!(
        read.load_by_key::<Account>("Ann").await.unwrap().owner,
        "Ann"
    );
    match read.load_by_key::<Account>("ANN").await {
        Err(Error::NotFound { target, .. }) => assert_eq!(target, Target::Key("ANN".into())),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // At most 255 bytes by default, in creates, loads and key changes alike.
    let longest = "k".repeat(255);
    account(store, &longest).await;
    let too_long = "é".repeat(128); // 256 bytes
    let refused = |result: Result<(), Error>| match result {
        Err(Error::InvalidKey { reason, .. }) => {
            assert!(
                reason.contains("256 bytes") && reason.contains("255"),
                "{reason}"
            )
        }
        other => panic!("expected InvalidKey, got {other:?}"),
    };
    let mut ctx = store.begin();
    refused(ctx.create_with_key::<Account>(&too_long).await.map(drop));
    refused(ctx.find_by_key::<Account>(&too_long).await.map(drop));
    let mut a = ctx.load_by_key::<Account>(&longest).await.unwrap();
    refused(ctx.change_key(&mut a, &too_long));
    assert_eq!(a.key(), Some(longest.as_str()));
}
