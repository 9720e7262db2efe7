use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Ticked;

#[derive(Aggregate, Default)]
#[aggregate(name = "meter", events(Ticked), snapshot_every = 10)]
struct Meter {
    ticks: u64,
}

impl Apply<Ticked> for Meter {
    fn apply(&mut self, _: &Ticked) {
        self.ticks += 1;
    }
}

fn main() {}
