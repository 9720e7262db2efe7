//! Test helper for `tests/subscription_soak.rs`: one worker of the subscription "soak", keeping
//! the `Ledger` read model, until it is killed (or after ten minutes, so a forgotten child stops
//! by itself).
//!
//! Usage: `annals-soak-worker URL SCHEMA TABLES [DELAY_MS]` (`SCHEMA` empty for SQLite;
//! `DELAY_MS` holds each batch up that long first).

#[path = "../conformance/domain.rs"]
#[allow(dead_code)]
mod domain;
#[path = "ledger.rs"]
mod ledger;

use std::time::Duration;

use annals::StoreOptions;
use annals::prelude::*;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(schema), Some(tables)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: annals-soak-worker URL SCHEMA TABLES".into());
    };
    let mut options = StoreOptions::new().pool_size(2);
    if !schema.is_empty() {
        options = options.schema(schema);
    }
    let store = Store::open_with(&url, options).await?;
    let delay = args
        .next()
        .map(|ms| ms.parse::<u64>())
        .transpose()?
        .unwrap_or(0);
    let mut handler = ledger::Ledger {
        tables,
        delay: Duration::from_millis(delay),
    };
    let worker = ledger::soak_subscription(&store);
    worker
        .run(&mut handler, tokio::time::sleep(Duration::from_secs(600)))
        .await?;
    Ok(())
}
