use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

#[derive(Event, Serialize, Deserialize)]
struct Painted;

// One listed event only: rustc must not infer the event type from it.
#[derive(Aggregate, Default)]
#[aggregate(name = "door", events(Opened))]
struct Door;

impl Apply<Opened> for Door {
    fn apply(&mut self, _: &Opened) {}
}

fn paint(ctx: &mut Context, door: &mut Root<Door>) -> Result<(), annals::Error> {
    ctx.apply(door, Painted)?;
    Ok(())
}

fn main() {}
