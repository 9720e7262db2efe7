use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Ticked;

#[derive(Aggregate, Serialize, Deserialize, Default)]
#[aggregate(name = "meter", events(Ticked), snapshot_evry = 5)]
struct Meter;

impl Apply<Ticked> for Meter {
    fn apply(&mut self, _: &Ticked) {}
}

fn main() {}
