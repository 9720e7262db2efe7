//! An event of a type this binary does not know (written by a newer release) reaching a
//! subscription: the handler refuses it, and the subscription's policy applies (parked, or
//! stopped) instead of the worker crashing; the other events go on.

#![cfg(feature = "sqlite")]

mod conformance;

use std::time::Duration;

use annals::prelude::*;
use annals::subscription::{Handler, OnFailure, SubscriptionState};
use annals::{BoxError, Error, Transaction};

/// Takes the events of types this binary knows; refuses the others.
#[derive(Default)]
struct KnownOnly {
    seen: Vec<String>,
}

impl Handler for KnownOnly {
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        for event in events {
            if annals::registry().event(&event.event_type).is_none() {
                return Err(format!("unknown event type {:?}", event.event_type).into());
            }
        }
        self.seen
            .extend(events.iter().map(|e| e.event_type.clone()));
        Ok(())
    }
}

/// Writes, as a newer release would, an event of the type `account.frozen` to `account`.
fn write_unknown(path: &std::path::Path, account: AggregateId) {
    let conn = annals::rusqlite::Connection::open(path).unwrap();
    conn.execute(
        "INSERT OR IGNORE INTO annals_event_types (name) VALUES ('account.frozen')",
        [],
    )
    .unwrap();
    let id = account.as_uuid().as_bytes().to_vec();
    let version: i64 = conn
        .query_row(
            "SELECT version FROM annals_aggregates WHERE id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    conn.execute(
        "INSERT INTO annals_events (aggregate_id, sequence, event_type_id, schema_version, \
         payload, metadata, recorded_at, event_id) \
         SELECT ?1, ?2, id, 1, X'7B7D', NULL, 0, ?3 FROM annals_event_types \
         WHERE name = 'account.frozen'",
        (&id, version + 1, uuid::Uuid::now_v7().as_bytes().to_vec()),
    )
    .unwrap();
    conn.execute(
        "UPDATE annals_aggregates SET version = ?2 WHERE id = ?1",
        (&id, version + 1),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_type_follows_the_failure_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unknown.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let alice = conformance::open_account(&store, "alice", "Alice", 1).await;
    let bob = conformance::open_account(&store, "bob", "Bob", 2).await;
    write_unknown(&path, alice);
    conformance::open_account(&store, "carol", "Carol", 3).await;

    // Parked: the others go on, alice's later events wait behind it.
    let parking = store
        .subscription("parking")
        .on_failure(OnFailure::Park)
        .retries(2, Duration::from_millis(1));
    let mut handler = KnownOnly::default();
    parking.catch_up(&mut handler).await.unwrap();
    assert_eq!(handler.seen.len(), 6, "everything but the unknown event");
    let parked = store.subscriptions().parked("parking").await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].aggregate_id, alice);
    assert!(
        parked[0].error.contains("account.frozen"),
        "{}",
        parked[0].error
    );
    let _ = bob;

    // Stopped: the subscription says where and why, and the worker returns the error.
    let stopping = store
        .subscription("stopping")
        .retries(2, Duration::from_millis(1));
    let mut handler = KnownOnly::default();
    match stopping.catch_up(&mut handler).await {
        Err(Error::SubscriptionFailed { message, .. }) => {
            assert!(message.contains("account.frozen"), "{message}")
        }
        other => panic!("expected the subscription to stop, got {other:?}"),
    }
    assert_eq!(handler.seen.len(), 4, "the events before it");
    let status = &store.subscriptions().status("stopping").await.unwrap()[0];
    assert_eq!(status.state, SubscriptionState::Failed);
    store.close().await;
}
