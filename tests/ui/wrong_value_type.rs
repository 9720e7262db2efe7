use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
#[event(name = "door.opened", version = "2")]
struct Opened;

fn main() {}
