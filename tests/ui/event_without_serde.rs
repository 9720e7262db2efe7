use annals::prelude::*;

// An event must be serde `Serialize` and `Deserialize`: its payload is its JSON.
#[derive(Event)]
#[event(name = "door.opened")]
struct Opened {
    by: String,
}

#[derive(Event, serde::Serialize)]
#[event(name = "door.closed")]
struct Closed;

fn main() {}
