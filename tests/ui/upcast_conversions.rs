use annals::Event;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct OpenedV1 {}

#[derive(Deserialize)]
struct OpenedV2 {}

impl From<OpenedV2> for Opened {
    fn from(_: OpenedV2) -> Self {
        Opened {}
    }
}

fn takes_a_string(_: String) {}

// No `From<OpenedV1> for OpenedV2`, and a JSON step with the wrong signature.
#[derive(Event, Serialize, Deserialize)]
#[event(version = 4, upcast(1 => OpenedV1, 2 => OpenedV2))]
struct Opened {}

#[derive(Event, Serialize, Deserialize)]
#[event(version = 2, upcast(1 => json(takes_a_string)))]
struct Closed {}

fn main() {}
