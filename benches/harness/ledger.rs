//! The domain both benchmarks run: a ledger of moves, with and without snapshots, and the same
//! fold for the raw baselines.

use std::time::SystemTime;

use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(name = "bench.moved")]
pub struct Moved {
    pub amount: i64,
    pub memo: String,
}

/// The state both ledgers fold their events into.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq, Clone)]
pub struct Totals {
    pub balance: i64,
    pub moves: u64,
    pub last_memo: String,
}

impl Totals {
    pub fn fold(&mut self, e: &Moved) {
        self.balance += e.amount;
        self.moves += 1;
        self.last_memo.clone_from(&e.memo);
    }
}

// `Clone`, so that a store with an aggregate cache keeps ledgers in it.
#[derive(Aggregate, Serialize, Deserialize, Default, Debug, Clone)]
#[aggregate(name = "bench.ledger", events(Moved))]
pub struct Ledger(pub Totals);

#[derive(Aggregate, Serialize, Deserialize, Default, Debug, Clone)]
#[aggregate(name = "bench.snapped_ledger", events(Moved), snapshot_every = 100)]
pub struct SnappedLedger(pub Totals);

impl Apply<Moved> for Ledger {
    fn apply(&mut self, e: &Moved) {
        self.0.fold(e)
    }
}

impl Apply<Moved> for SnappedLedger {
    fn apply(&mut self, e: &Moved) {
        self.0.fold(e)
    }
}

/// Both ledgers, for the generic load workload.
pub trait LedgerAggregate:
    Aggregate + annals::Handles<Moved> + Apply<Moved> + serde::de::DeserializeOwned
{
    fn totals(&self) -> &Totals;
}

impl LedgerAggregate for Ledger {
    fn totals(&self) -> &Totals {
        &self.0
    }
}

impl LedgerAggregate for SnappedLedger {
    fn totals(&self) -> &Totals {
        &self.0
    }
}

pub fn moved(i: usize) -> Moved {
    Moved {
        amount: i as i64 % 97 - 40,
        memo: format!("payment reference {i:08}"),
    }
}

pub fn micros_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
