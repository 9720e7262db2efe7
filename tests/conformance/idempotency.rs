//! Idempotent commits on every store: a retried commit whose events are stored already is
//! reported as already committed, never as a conflict or a duplicate.

use annals::Error;
use annals::prelude::*;

use super::domain::*;

/// One deposit command, run with the idempotency key `request`.
async fn deposit_once(
    store: &Store,
    key: &str,
    request: uuid::Uuid,
    amount: i64,
) -> Result<bool, Error> {
    let mut ctx = store.begin();
    ctx.set_idempotency_key(request);
    let mut account = ctx.load_by_key::<Account>(key).await?;
    ctx.apply(&mut account, Deposited { amount })?;
    ctx.apply(&mut account, Withdrawn { amount: 1 })?;
    Ok(ctx.commit().await?.already_committed())
}

pub async fn a_retried_commit_is_already_committed(store: &Store) {
    let ann = super::open_account(store, "ann", "Ann", 0).await;
    let request = uuid::Uuid::now_v7();
    assert!(!deposit_once(store, "ann", request, 10).await.unwrap());
    // The retry, after an answer that was lost: nothing is written twice.
    assert!(deposit_once(store, "ann", request, 10).await.unwrap());
    assert!(deposit_once(store, "ann", request, 10).await.unwrap());
    let history = store.history(ann).await.unwrap();
    assert_eq!(history.len(), 3);
    let account = store.begin_read_only().load::<Account>(ann).await.unwrap();
    assert_eq!((account.balance, account.version()), (9, 3));

    // Another request is another commit.
    assert!(
        !deposit_once(store, "ann", uuid::Uuid::now_v7(), 5)
            .await
            .unwrap()
    );
    assert_eq!(store.history(ann).await.unwrap().len(), 5);

    // A retry that stages more events than the run that committed: partly stored, and
    // nothing written.
    let mut ctx = store.begin();
    ctx.set_idempotency_key(request);
    let mut a = ctx.load::<Account>(ann).await.unwrap();
    for amount in [10, 1, 7] {
        ctx.apply(&mut a, Deposited { amount }).unwrap();
    }
    match ctx.commit().await {
        Err(Error::PartlyCommitted { .. }) => {}
        other => panic!("expected PartlyCommitted, got {other:?}"),
    }
    assert_eq!(
        store.history(ann).await.unwrap().len(),
        5,
        "nothing written"
    );
}

pub async fn chosen_event_ids_are_checked(store: &Store) {
    let ann = super::open_account(store, "ann", "Ann", 0).await;
    let bob = super::open_account(store, "bob", "Bob", 0).await;
    let id = uuid::Uuid::now_v7();
    let commit = |account: AggregateId, event: uuid::Uuid| async move {
        let mut ctx = store.begin();
        let mut a = ctx.load::<Account>(account).await?;
        let returned = ctx.apply_with_id(&mut a, Deposited { amount: 3 }, event)?;
        assert_eq!(returned, event);
        ctx.commit().await
    };
    assert!(!commit(ann, id).await.unwrap().already_committed());
    assert_eq!(store.history(ann).await.unwrap()[1].event_id, id);
    // The same id again for the same aggregate: stored already.
    assert!(commit(ann, id).await.unwrap().already_committed());
    // The id on another aggregate: taken, nothing written.
    match commit(bob, id).await {
        Err(Error::EventIdTaken { event_id }) => assert_eq!(event_id, id),
        other => panic!("expected EventIdTaken, got {other:?}"),
    }
    assert_eq!(store.history(bob).await.unwrap().len(), 1);
    // Twice in one context: refused at once.
    let mut ctx = store.begin();
    let mut a = ctx.load::<Account>(bob).await.unwrap();
    let twice = uuid::Uuid::now_v7();
    ctx.apply_with_id(&mut a, Deposited { amount: 1 }, twice)
        .unwrap();
    assert!(matches!(
        ctx.apply_with_id(&mut a, Deposited { amount: 1 }, twice),
        Err(Error::EventIdTaken { .. })
    ));
    // A command that creates its aggregate, retried: `load_or_create_by_key` loads what the
    // first run created, and the retry is already committed.
    let request = uuid::Uuid::now_v7();
    for attempt in 0..2 {
        let mut ctx = store.begin();
        ctx.set_idempotency_key(request);
        let mut c = ctx.load_or_create_by_key::<Account>("cy").await.unwrap();
        ctx.apply(&mut c, Opened { owner: "Cy".into() }).unwrap();
        assert_eq!(
            ctx.commit().await.unwrap().already_committed(),
            attempt == 1
        );
    }
    let cy = store
        .begin_read_only()
        .load_by_key::<Account>("cy")
        .await
        .unwrap();
    assert_eq!(cy.version(), 1);
}
