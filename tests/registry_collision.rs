//! Two Rust types registered under one event name: opening a store fails, naming both.

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
    match Store::open("memory:").await {
        Err(Error::TypeNameCollision {
            kind,
            name,
            first,
            second,
        }) => {
            assert_eq!((kind, name.as_str()), ("event", "paid"));
            assert!(first.ends_with("billing::Paid"), "{first}");
            assert!(second.ends_with("shipping::Paid"), "{second}");
        }
        other => panic!("expected TypeNameCollision, got {other:?}"),
    }
    let message = annals::registry().validate().unwrap_err().to_string();
    assert!(
        message.contains("billing::Paid") && message.contains("shipping::Paid"),
        "{message}"
    );
}
