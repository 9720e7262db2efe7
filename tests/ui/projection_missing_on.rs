use annals::prelude::*;
use annals::{BoxError, Transaction};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

#[derive(Event, Serialize, Deserialize)]
struct Closed;

#[derive(Projection)]
#[projection(name = "doors", events(Opened, Closed))]
struct Doors;

impl On<Opened> for Doors {
    async fn on(&mut self, _: Opened, _: &Envelope, _: &mut Transaction<'_>) -> Result<(), BoxError> {
        Ok(())
    }
}

fn main() {}
