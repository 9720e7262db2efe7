//! Event evolution on every store: events stored with older schema versions and under former
//! names are read as the current types by loads, histories, the feed and projections.

use annals::prelude::*;
use annals::subscription::{Envelope, On};
use annals::{BoxError, Error, Filter, JsonEvent, Transaction};
use serde::{Deserialize, Serialize};

/// Version 1 stored `cents`; version 2 `amount`; version 3 added `currency`. The first step
/// edits the JSON, the second is typed.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(
    name = "evo.deposited",
    alias = "evo.credited",
    version = 3,
    upcast(1 => json(deposited_v1), 2 => DepositedV2)
)]
pub struct Funded {
    pub amount: i64,
    pub currency: String,
}

fn deposited_v1(event: &mut JsonEvent) {
    event.rename("cents", "amount");
}

/// How version 2 looked.
#[derive(Deserialize)]
pub struct DepositedV2 {
    amount: i64,
}

impl From<DepositedV2> for Funded {
    fn from(v2: DepositedV2) -> Self {
        Funded {
            amount: v2.amount,
            currency: "EUR".into(),
        }
    }
}

/// Version 1 of `Withdrawn` stored `cents`; `evo.debited` is its former name.
#[derive(Event, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[event(version = 2, upcast(1 => json(spent_v1)))]
pub enum Spent {
    #[event(name = "evo.withdrawn", alias = "evo.debited")]
    Withdrawn { amount: i64 },
    #[event(name = "evo.frozen")]
    Frozen,
}

fn spent_v1(event: &mut JsonEvent) {
    if event.name() == "evo.withdrawn" {
        event.rename("cents", "amount");
    }
}

#[derive(Aggregate, Serialize, Deserialize, Default, Debug, Clone)]
#[aggregate(name = "evo.wallet", events(Funded, Spent))]
pub struct Wallet {
    pub balance: i64,
    pub currencies: Vec<String>,
    pub frozen: bool,
}

impl Apply<Funded> for Wallet {
    fn apply(&mut self, e: &Funded) {
        self.balance += e.amount;
        self.currencies.push(e.currency.clone());
    }
}

impl Apply<Spent> for Wallet {
    fn apply(&mut self, e: &Spent) {
        match e {
            Spent::Withdrawn { amount } => self.balance -= amount,
            Spent::Frozen => self.frozen = true,
        }
    }
}

/// The events as stored: name, schema version, payload.
const STORED: [(&str, u32, &str); 6] = [
    ("evo.deposited", 1, r#"{"cents":100}"#),
    ("evo.deposited", 2, r#"{"amount":20}"#),
    ("evo.credited", 3, r#"{"amount":4,"currency":"USD"}"#),
    ("evo.debited", 1, r#"{"cents":7}"#),
    ("evo.withdrawn", 2, r#"{"amount":1}"#),
    ("evo.frozen", 1, "null"),
];

/// The same events as the current types read them.
fn current() -> Vec<Result<Funded, Spent>> {
    vec![
        Ok(Funded {
            amount: 100,
            currency: "EUR".into(),
        }),
        Ok(Funded {
            amount: 20,
            currency: "EUR".into(),
        }),
        Ok(Funded {
            amount: 4,
            currency: "USD".into(),
        }),
        Err(Spent::Withdrawn { amount: 7 }),
        Err(Spent::Withdrawn { amount: 1 }),
        Err(Spent::Frozen),
    ]
}

fn read(event: &RecordedEvent) -> Result<Funded, Spent> {
    match event.decode::<Funded>().unwrap() {
        Some(funded) => Ok(funded),
        None => Err(event.decode::<Spent>().unwrap().expect("a wallet event")),
    }
}

/// Writes the stored forms above, then one current event, to a new wallet.
async fn stored_wallet(store: &Store) -> AggregateId {
    let mut ctx = store.begin();
    let mut wallet = ctx.create::<Wallet>().unwrap();
    for (name, version, payload) in STORED {
        ctx.apply_encoded(&mut wallet, name, version, payload.as_bytes().to_vec())
            .unwrap();
    }
    ctx.apply(
        &mut wallet,
        Funded {
            amount: 3,
            currency: "EUR".into(),
        },
    )
    .unwrap();
    // What was applied in memory is what a load reads back.
    assert_eq!(wallet.balance, 100 + 20 + 4 - 7 - 1 + 3);
    let id = wallet.id();
    ctx.commit().await.unwrap();
    id
}

pub async fn every_stored_version_reads_as_the_current_one(store: &Store) {
    let id = stored_wallet(store).await;
    let mut expected = current();
    expected.push(Ok(Funded {
        amount: 3,
        currency: "EUR".into(),
    }));

    let wallet = store.begin_read_only().load::<Wallet>(id).await.unwrap();
    assert_eq!(wallet.version(), 7);
    assert_eq!(wallet.balance, 119);
    assert_eq!(wallet.currencies, ["EUR", "EUR", "USD", "EUR"]);
    assert!(wallet.frozen);

    // Stored events keep the name and version they were written with.
    let history = store.history(id).await.unwrap();
    let stored: Vec<(&str, u32)> = history
        .iter()
        .map(|e| (e.event_type.as_str(), e.schema_version))
        .collect();
    let mut written: Vec<(&str, u32)> = STORED.iter().map(|(n, v, _)| (*n, *v)).collect();
    written.push(("evo.deposited", 3));
    assert_eq!(stored, written);
    assert_eq!(history.iter().map(read).collect::<Vec<_>>(), expected);

    // The feed, and a filter by type that takes the former name too.
    let feed = super::read_feed_to_end(store, FeedCursor::START, 100).await;
    assert_eq!(feed.iter().map(read).collect::<Vec<_>>(), expected);
    let filter = Filter::all().event::<Funded>();
    let (funded, _) = super::read_matching_to_end(store, FeedCursor::START, 100, &filter).await;
    assert_eq!(
        funded.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 7]
    );

    // A typed projection.
    let mut ledger = Ledger::default();
    let sub = store.projection::<Ledger>();
    assert_eq!(sub.catch_up(&mut ledger).await.unwrap(), 7);
    assert_eq!(ledger.seen, expected);
}

pub async fn a_newer_version_than_the_code_knows_is_refused(store: &Store) {
    let mut ctx = store.begin();
    let mut wallet = ctx.create::<Wallet>().unwrap();
    match ctx.apply_encoded(&mut wallet, "evo.deposited", 4, br#"{"amount":1}"#.to_vec()) {
        Err(Error::EventVersionTooNew {
            event_type,
            schema_version,
            known,
            ..
        }) => assert_eq!(
            (event_type.as_str(), schema_version, known),
            ("evo.deposited", 4, 3)
        ),
        other => panic!("expected EventVersionTooNew, got {other:?}"),
    }
    // Not one of the wallet's events, and a payload of the wrong shape: typed errors, and the
    // root is unchanged.
    assert!(matches!(
        ctx.apply_encoded(&mut wallet, "account.deposited", 1, b"{}".to_vec()),
        Err(Error::UnknownEventType { .. })
    ));
    assert!(matches!(
        ctx.apply_encoded(
            &mut wallet,
            "evo.deposited",
            2,
            br#"{"amount":"x"}"#.to_vec()
        ),
        Err(Error::Decode { .. })
    ));
    assert_eq!((wallet.version(), wallet.balance), (0, 0));
    assert_eq!(ctx.staged_events(), 0);
}

/// Every wallet event as the projection receives it.
#[derive(annals::Projection, Default)]
#[projection(name = "evo.ledger", events(Funded, Spent))]
pub struct Ledger {
    seen: Vec<Result<Funded, Spent>>,
}

impl On<Funded> for Ledger {
    async fn on(
        &mut self,
        event: Funded,
        _: &Envelope,
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        self.seen.push(Ok(event));
        Ok(())
    }
}

impl On<Spent> for Ledger {
    async fn on(
        &mut self,
        event: Spent,
        _: &Envelope,
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        self.seen.push(Err(event));
        Ok(())
    }
}
