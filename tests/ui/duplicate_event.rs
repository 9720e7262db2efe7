use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

#[derive(Aggregate, Default)]
#[aggregate(name = "door", events(Opened, Opened))]
struct Door;

impl Apply<Opened> for Door {
    fn apply(&mut self, _: &Opened) {}
}

fn main() {}
