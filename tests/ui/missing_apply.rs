use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

#[derive(Event, Serialize, Deserialize)]
struct Closed;

#[derive(Aggregate, Default)]
#[aggregate(name = "door", events(Opened, Closed))]
struct Door {
    open: bool,
}

impl Apply<Opened> for Door {
    fn apply(&mut self, _: &Opened) {
        self.open = true;
    }
}

fn main() {}
