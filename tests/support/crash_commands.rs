// The crash writer's command, shared with the test that replays it (included by both, each
// with its own `Counter` and `CounterEvent` in scope).

use annals::prelude::*;

/// The idempotency key of round `round` in `--idempotent` mode.
pub fn round_key(round: u64) -> uuid::Uuid {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("crash-{round}").as_bytes())
}

/// One round's command: 1 to 3 increments of the counter `crash`, under the key of the round
/// when given. Returns the counter's version and what the commit did.
pub async fn increment(
    store: &Store,
    round: u64,
    key: Option<uuid::Uuid>,
) -> Result<(u64, annals::Committed), Error> {
    let mut ctx = store.begin();
    if let Some(key) = key {
        ctx.set_idempotency_key(key);
    }
    let mut counter = ctx.load_or_create_by_key::<Counter>("crash").await?;
    // Commits of 1 to 3 events, so a kill can land inside a multi-event commit.
    for _ in 0..=(round % 3) {
        ctx.apply(&mut counter, CounterEvent::Incremented)?;
    }
    let version = counter.version();
    Ok((version, ctx.commit().await?))
}
