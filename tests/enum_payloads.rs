//! Enum events are stored as their variant's content and read back by their registered name:
//! a variant renamed in Rust keeps reading, and events written in serde's externally tagged form
//! by earlier versions keep loading.

use annals::prelude::*;
use annals::{Error, RecordedEvent};
use serde::{Deserialize, Serialize};

/// The release after a rename: `Confirmed` became `Approved`, `Created` became `Placed`,
/// `Changed` became `Amended`; the registered names stayed.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
enum OrderEvent {
    #[event(name = "order.confirmed")]
    Approved { by: String },
    #[event(name = "order.placed")]
    Placed,
    #[event(name = "order.amended")]
    Amended(u32),
}

/// serde renames the variants: the registered names still decide.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Shipping {
    #[event(name = "shipping.sent")]
    SentOut { to: String },
    #[event(name = "shipping.lost")]
    LostInTransit,
}

/// Not externally tagged: stored whole, as serde writes it.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind")]
enum Billing {
    #[event(name = "billing.charged")]
    Charged { cents: i64 },
    #[event(name = "billing.refunded")]
    Refunded { cents: i64 },
}

#[derive(Aggregate, Default, Debug)]
#[aggregate(name = "order", events(OrderEvent, Shipping, Billing))]
struct Order {
    seen: Vec<String>,
}

impl Apply<OrderEvent> for Order {
    fn apply(&mut self, e: &OrderEvent) {
        self.seen.push(format!("{e:?}"));
    }
}

impl Apply<Shipping> for Order {
    fn apply(&mut self, e: &Shipping) {
        self.seen.push(format!("{e:?}"));
    }
}

impl Apply<Billing> for Order {
    fn apply(&mut self, e: &Billing) {
        self.seen.push(format!("{e:?}"));
    }
}

/// An event as a store would hand it back, with `payload` stored under `name`.
fn recorded(name: &str, payload: &str) -> RecordedEvent {
    RecordedEvent {
        cursor: FeedCursor::START,
        aggregate_id: AggregateId::new(),
        aggregate_type: "order".into(),
        key: None,
        version: 1,
        event_type: name.into(),
        schema_version: 1,
        payload: payload.as_bytes().to_vec(),
        event_id: uuid::Uuid::now_v7(),
        recorded_at: std::time::SystemTime::now(),
        metadata: Metadata::default(),
    }
}

#[test]
fn old_tagged_payloads_decode_by_registered_name_after_a_rename() {
    let cases = [
        (
            "order.confirmed",
            r#"{"Confirmed":{"by":"ann"}}"#,
            OrderEvent::Approved { by: "ann".into() },
        ),
        ("order.placed", r#""Created""#, OrderEvent::Placed),
        ("order.amended", r#"{"Changed":5}"#, OrderEvent::Amended(5)),
        // The form written now.
        (
            "order.confirmed",
            r#"{"by":"bo"}"#,
            OrderEvent::Approved { by: "bo".into() },
        ),
        ("order.placed", "null", OrderEvent::Placed),
        ("order.amended", "7", OrderEvent::Amended(7)),
    ];
    for (name, payload, want) in cases {
        let got = recorded(name, payload).decode::<OrderEvent>();
        assert_eq!(got.unwrap(), Some(want), "{name} {payload}");
    }
    assert_eq!(
        recorded("order.shipped", "null")
            .decode::<OrderEvent>()
            .unwrap(),
        None
    );
    for (name, payload) in [
        ("order.amended", r#""seven""#),
        ("order.confirmed", r#"{"by":1}"#),
    ] {
        assert!(
            matches!(
                recorded(name, payload).decode::<OrderEvent>(),
                Err(Error::Decode { .. })
            ),
            "{name} {payload}"
        );
    }
}

#[tokio::test]
async fn enum_events_round_trip_whatever_their_serde_form() {
    let store = Store::open("memory:").await.unwrap();
    let id = store
        .transact(async |ctx| {
            let mut order = ctx.create::<Order>()?;
            ctx.apply(&mut order, OrderEvent::Placed)?;
            ctx.apply(&mut order, Shipping::SentOut { to: "Oslo".into() })?;
            ctx.apply(&mut order, Shipping::LostInTransit)?;
            ctx.apply(&mut order, Billing::Charged { cents: 120 })?;
            ctx.apply(&mut order, Billing::Refunded { cents: 120 })?;
            Ok::<_, Error>(order.id())
        })
        .await
        .unwrap();
    let order = store.begin_read_only().load::<Order>(id).await.unwrap();
    assert_eq!(
        order.seen,
        [
            "Placed",
            "SentOut { to: \"Oslo\" }",
            "LostInTransit",
            "Charged { cents: 120 }",
            "Refunded { cents: 120 }",
        ]
    );
    let payloads: Vec<serde_json::Value> = store
        .history(id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.payload_json().unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            serde_json::Value::Null,
            serde_json::json!({ "to": "Oslo" }),
            serde_json::Value::Null,
            serde_json::json!({ "kind": "Charged", "cents": 120 }),
            serde_json::json!({ "kind": "Refunded", "cents": 120 }),
        ]
    );
}
