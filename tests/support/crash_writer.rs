//! Test helper for `tests/sqlite_store.rs`: commits to a counter in a loop and prints
//! `ACK <version>` after each acknowledged commit, until it is killed (or after 1,000,000
//! commits, so a forgotten child stops by itself). With `--idempotent`, round `n` commits
//! with the idempotency key `round_key(n)` (in `crash_commands.rs`) and prints `SENT <n>` before it commits.
//!
//! Usage: `annals-crash-writer sqlite://path/to/file.db [--idempotent]`

#[path = "../conformance/domain.rs"]
#[allow(dead_code)]
mod domain;

use std::io::Write;

use annals::prelude::*;

mod commands {
    use crate::domain::{Counter, CounterEvent};
    include!("crash_commands.rs");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: annals-crash-writer URL [--idempotent]")?;
    let idempotent = std::env::args().nth(2).as_deref() == Some("--idempotent");
    let store = Store::open(&url).await?;
    let mut stdout = std::io::stdout().lock();
    for round in 0..1_000_000u64 {
        if idempotent {
            writeln!(stdout, "SENT {round}")?;
            stdout.flush()?;
        }
        let key = idempotent.then(|| commands::round_key(round));
        let (version, _) = commands::increment(&store, round, key).await?;
        writeln!(stdout, "ACK {version}")?;
        stdout.flush()?;
    }
    Ok(())
}
