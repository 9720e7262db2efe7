use annals::prelude::*;
use annals::{BoxError, Transaction};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize)]
struct Opened;

#[derive(Projection)]
#[projection(events(Opened), reset = clear)]
struct Model;

impl On<Opened> for Model {
    async fn on(&mut self, _: Opened, _: &Envelope, _: &mut Transaction<'_>) -> Result<(), BoxError> {
        Ok(())
    }
}

fn main() {}
