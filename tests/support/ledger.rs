//! The read model of the subscription soak tests, shared by the test and the worker process
//! (`annals-soak-worker`): each account's sum of deposits, and each event's effect, once.

use std::time::Duration;

use annals::prelude::*;
use annals::subscription::Handler;
use annals::{BoxError, Filter, SqlValue, Subscription, Transaction};

use super::domain::Deposited;

/// The handler: `tables` names the model's tables (`{tables}_effects`, `{tables}_sums`).
/// `delay` holds each batch up first: a slow handler, most of the time inside a batch.
#[derive(Clone)]
pub struct Ledger {
    pub tables: String,
    pub delay: Duration,
}

impl Handler for Ledger {
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let t = &self.tables;
        for event in events {
            let Some(deposit) = event.decode::<Deposited>()? else {
                continue;
            };
            // A plain insert: an event handled twice fails on the key.
            tx.execute(
                &format!("INSERT INTO {t}_effects (event_id) VALUES ($1)"),
                &[event.event_id.into()],
            )
            .await?;
            tx.execute(
                &format!(
                    "INSERT INTO {t}_sums AS s (account, total) VALUES ($1, $2) \
                     ON CONFLICT (account) DO UPDATE SET total = s.total + excluded.total"
                ),
                &[event.aggregate_id.into(), SqlValue::Int(deposit.amount)],
            )
            .await?;
        }
        Ok(())
    }

    async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        let t = &self.tables;
        tx.execute(
            &format!("CREATE TABLE IF NOT EXISTS {t}_effects (event_id TEXT PRIMARY KEY)"),
            &[],
        )
        .await?;
        tx.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {t}_sums (account TEXT PRIMARY KEY, total BIGINT NOT NULL)"
            ),
            &[],
        )
        .await?;
        Ok(())
    }
}

/// The subscription the soak tests run: deposits, four partitions, short leases.
pub fn soak_subscription(store: &Store) -> Subscription {
    store
        .subscription("soak")
        .filter(Filter::all().event::<Deposited>())
        .partitions(4)
        .batch_size(50)
        .lease(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(20))
}
