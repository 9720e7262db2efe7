//! Two Rust types registered under one event name: opening a store fails, naming both.

use annals::prelude::*;
use serde::{Deserialize, Serialize};

mod billing {
    use super::*;
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "paid")]
    pub struct Paid;
}

mod shipping {
    use super::*;
    #[derive(Event, Serialize, Deserialize)]
    #[event(name = "paid")]
    pub struct Paid;
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
