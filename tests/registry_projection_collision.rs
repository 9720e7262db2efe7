//! Two projection types under one subscription name, which would share one position: opening a
//! store fails, naming both.

#[path = "support/collision.rs"]
mod collision;

use annals::prelude::*;
use annals::subscription::{Envelope, On};
use annals::{BoxError, Transaction};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(name = "ledger.posted")]
pub struct Posted;

mod daily {
    use super::*;
    #[derive(Projection, Default)]
    #[projection(name = "totals", events(Posted))]
    #[expect(dead_code, reason = "only registered: the store refuses to open")]
    pub struct Totals;

    impl On<Posted> for Totals {
        async fn on(
            &mut self,
            _: Posted,
            _: &Envelope,
            _: &mut Transaction<'_>,
        ) -> Result<(), BoxError> {
            Ok(())
        }
    }
}

mod monthly {
    use super::*;
    #[derive(Projection, Default)]
    #[projection(name = "totals", events(Posted))]
    #[expect(dead_code, reason = "only registered: the store refuses to open")]
    pub struct Totals;

    impl On<Posted> for Totals {
        async fn on(
            &mut self,
            _: Posted,
            _: &Envelope,
            _: &mut Transaction<'_>,
        ) -> Result<(), BoxError> {
            Ok(())
        }
    }
}

#[tokio::test]
async fn two_projections_under_one_name_refuse_to_open() {
    collision::refused_to_open("projection", "totals", "daily::Totals", "monthly::Totals").await;
    // The event both list is registered once.
    let registry = annals::registry();
    let posted: Vec<_> = registry
        .events()
        .iter()
        .filter(|e| e.name == "ledger.posted")
        .collect();
    assert_eq!(posted.len(), 1);
}
