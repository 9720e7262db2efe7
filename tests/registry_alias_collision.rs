//! An alias that is another type's name: opening a store fails, naming both types.

use annals::prelude::*;
use serde::{Deserialize, Serialize};

mod billing {
    use super::*;
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "invoice.paid")]
    pub struct Paid;
}

mod shipping {
    use super::*;
    /// Claims the billing event's name as a former name of its own.
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "parcel.paid", alias = "invoice.paid")]
    pub struct Paid;
}

#[tokio::test]
async fn an_alias_that_is_another_types_name_refuses_to_open() {
    match Store::open("memory:").await {
        Err(Error::TypeNameCollision {
            kind,
            name,
            first,
            second,
        }) => {
            assert_eq!((kind, name.as_str()), ("event", "invoice.paid"));
            assert!(first.ends_with("billing::Paid"), "{first}");
            assert!(second.ends_with("shipping::Paid"), "{second}");
        }
        other => panic!("expected TypeNameCollision, got {other:?}"),
    }
}
