use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Ticked;

#[derive(Aggregate, Serialize, Deserialize, Default)]
#[aggregate(nmae = "meter", events(Ticked), snapshot_every = 0, snapshot_version = "one")]
struct Meter;

impl Apply<Ticked> for Meter {
    fn apply(&mut self, _: &Ticked) {}
}

fn main() {}
