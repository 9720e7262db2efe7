use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

#[derive(Event, Serialize, Deserialize)]
struct Closed;

#[derive(Event, Serialize, Deserialize)]
struct Painted;

#[derive(Aggregate, Default)]
#[aggregate(name = "door", events(Opened, Closed))]
struct Door;

impl Apply<Opened> for Door {
    fn apply(&mut self, _: &Opened) {}
}

impl Apply<Closed> for Door {
    fn apply(&mut self, _: &Closed) {}
}

impl Apply<Painted> for Door {
    fn apply(&mut self, _: &Painted) {}
}

fn paint(ctx: &mut Context, door: &mut Root<Door>) -> Result<(), annals::Error> {
    ctx.apply(door, Painted)?;
    Ok(())
}

fn main() {}
