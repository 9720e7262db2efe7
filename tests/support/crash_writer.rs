//! Test helper for `tests/sqlite_store.rs`: commits to a counter in a loop and prints
//! `ACK <version>` after each acknowledged commit, until it is killed (or after 1,000,000
//! commits, so a forgotten child stops by itself).
//!
//! Usage: `annals-crash-writer sqlite://path/to/file.db`

#[path = "../conformance/domain.rs"]
#[allow(dead_code)]
mod domain;

use std::io::Write;

use annals::prelude::*;
use domain::{Counter, CounterEvent};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: annals-crash-writer URL")?;
    let store = Store::open(&url).await?;
    let mut stdout = std::io::stdout().lock();
    for round in 0..1_000_000u64 {
        let version = store
            .transact(async |ctx| {
                let mut counter = ctx.load_or_create_by_key::<Counter>("crash").await?;
                // Commits of 1 to 3 events, so a kill can land inside a multi-event commit.
                for _ in 0..=(round % 3) {
                    ctx.apply(&mut counter, CounterEvent::Incremented)?;
                }
                Ok::<_, Error>(counter.version())
            })
            .await?;
        writeln!(stdout, "ACK {version}")?;
        stdout.flush()?;
    }
    Ok(())
}
