//! Two Rust types registered under one event name: opening a store fails, naming both.

#[path = "support/collision.rs"]
mod collision;

use annals::prelude::*;
use serde::{Deserialize, Serialize};

// An event type is registered by the aggregates that list it: each module's aggregate lists its
// own `Paid`.

mod billing {
    use super::*;
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "paid")]
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
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "paid")]
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
async fn two_types_under_one_name_refuse_to_open() {
    collision::refused_to_open("event", "paid", "billing::Paid", "shipping::Paid").await;
    let message = annals::registry().validate().unwrap_err().to_string();
    assert!(
        message.contains("billing::Paid") && message.contains("shipping::Paid"),
        "{message}"
    );
}
