use annals::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
enum DoorEvent {
    #[event(name = "door.moved")]
    Opened,
    #[event(name = "door.moved")]
    Closed,
}

fn main() {}
