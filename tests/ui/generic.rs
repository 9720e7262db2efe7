use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Added;

#[derive(Aggregate, Default)]
#[aggregate(events(Added))]
struct Bag<T> {
    items: Vec<T>,
}

fn main() {}
