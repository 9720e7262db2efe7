//! An aggregate that lists an event type the registry lacks (one that implements `Event` by
//! hand, without registering): opening a store fails, naming both.

use annals::prelude::*;

/// Implements `Event` by hand and is therefore not registered.
pub struct Rang;

impl Event for Rang {
    const NAMES: &'static [&'static str] = &["bell.rang"];
    const VERSION: u32 = 1;
    fn name(&self) -> &'static str {
        "bell.rang"
    }
    fn encode(&self) -> Result<Vec<u8>, annals::BoxError> {
        Ok(b"null".to_vec())
    }
    fn decode(_: &str, _: u32, _: &[u8]) -> Result<Self, annals::BoxError> {
        Ok(Rang)
    }
}

#[derive(Aggregate, Default)]
#[aggregate(name = "bell", events(Rang))]
pub struct Bell;

impl Apply<Rang> for Bell {
    fn apply(&mut self, _: &Rang) {}
}

#[tokio::test]
async fn unregistered_listed_event_refuses_to_open() {
    match Store::open("memory:").await {
        Err(Error::UnregisteredEvent {
            aggregate_type,
            event_type,
        }) => {
            assert_eq!(aggregate_type, "bell");
            assert!(event_type.ends_with("Rang"), "{event_type}");
        }
        other => panic!("expected UnregisteredEvent, got {other:?}"),
    }
}
