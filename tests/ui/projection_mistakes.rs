use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

#[derive(Projection)]
#[projection(name = "a", events(Opened, Opened), batch = 10)]
struct Twice;

#[derive(Projection)]
#[projection(name = "b")]
struct NoEvents;

#[derive(Projection)]
#[projection(events(Opened), reset = "clear")]
struct QuotedReset;

#[derive(Projection)]
#[projection(events(Opened))]
struct Generic<T>(T);

fn main() {}
