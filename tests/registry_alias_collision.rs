//! An alias that is another type's name: opening a store fails, naming both types.

#[path = "support/collision.rs"]
mod collision;

use annals::prelude::*;
use serde::{Deserialize, Serialize};

// An event type is registered by the aggregates that list it: each module's aggregate lists its
// own `Paid`.

mod billing {
    use super::*;
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "invoice.paid")]
    pub struct Paid;

    #[derive(Aggregate, Default)]
    #[aggregate(name = "invoice", events(Paid))]
    #[expect(dead_code, reason = "only registered: the store refuses to open")]
    pub struct Invoice;

    impl Apply<Paid> for Invoice {
        fn apply(&mut self, _: &Paid) {}
    }
}

mod shipping {
    use super::*;
    /// Claims the billing event's name as a former name of its own.
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "parcel.paid", alias = "invoice.paid")]
    pub struct Paid;

    #[derive(Aggregate, Default)]
    #[aggregate(name = "parcel", events(Paid))]
    #[expect(dead_code, reason = "only registered: the store refuses to open")]
    pub struct Parcel;

    impl Apply<Paid> for Parcel {
        fn apply(&mut self, _: &Paid) {}
    }
}

#[tokio::test]
async fn an_alias_that_is_another_types_name_refuses_to_open() {
    collision::refused_to_open("event", "invoice.paid", "billing::Paid", "shipping::Paid").await;
}
