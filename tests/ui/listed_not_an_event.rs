use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

// Not derived as an event.
struct Reserved;

#[derive(Aggregate, Default)]
#[aggregate(name = "room", events(Opened, Reserved))]
struct Room;

impl Apply<Opened> for Room {
    fn apply(&mut self, _: &Opened) {}
}

impl Apply<Reserved> for Room {
    fn apply(&mut self, _: &Reserved) {}
}

fn main() {}
