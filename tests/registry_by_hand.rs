//! An event type that implements `Event` by hand, without the derive (not supported: it names
//! hidden items), as the runtime's own `annals.erased` does: the aggregate that lists it
//! registers it, so a store opens, commits it and loads it back, and the registry lists it under
//! the path the aggregate's list spells.

use annals::prelude::*;

/// Implements `Event` by hand: a ring is stored as the JSON `null`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Rang;

impl Event for Rang {
    const REGISTRATION: annals::__private::EventRegistration =
        annals::__private::EventRegistration::by_hand::<Rang>(&["bell.rang"], 1);
    fn name(&self) -> &'static str {
        "bell.rang"
    }
    fn encode(&self) -> Result<Vec<u8>, annals::BoxError> {
        Ok(b"null".to_vec())
    }
    fn decode(_: &str, _: u32, payload: &[u8]) -> Result<Self, annals::BoxError> {
        match payload {
            b"null" => Ok(Rang),
            other => Err(format!("a ring is stored as null, not {other:?}").into()),
        }
    }
}

#[derive(Aggregate, Default)]
#[aggregate(name = "bell", events(Rang))]
pub struct Bell {
    rings: u32,
}

impl Apply<Rang> for Bell {
    fn apply(&mut self, _: &Rang) {
        self.rings += 1;
    }
}

#[tokio::test]
async fn a_listed_event_written_by_hand_is_registered() {
    let registry = annals::registry();
    registry.validate().unwrap();
    let info = registry.event("bell.rang").expect("registered by `bell`");
    assert_eq!((info.rust_type, info.schema_version), ("Rang", 1));
    assert!(info.aliases.is_empty());
    assert_eq!(registry.aggregate("bell").unwrap().events, ["bell.rang"]);

    let store = Store::open("memory:").await.unwrap();
    let id = store
        .transact(async |ctx| {
            let mut bell = ctx.create::<Bell>()?;
            ctx.apply(&mut bell, Rang)?;
            ctx.apply(&mut bell, Rang)?;
            Ok::<_, Error>(bell.id())
        })
        .await
        .unwrap();
    let bell = store.begin_read_only().load::<Bell>(id).await.unwrap();
    assert_eq!((bell.rings, bell.version()), (2, 2));
    let names: Vec<String> = store
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(names, ["bell.rang", "bell.rang"]);
}
