//! The registry as users inspect it.

mod conformance;

use annals::{BoxError, Event, Transaction};
use conformance::domain::*;
use serde::{Deserialize, Serialize};

/// An event type that no aggregate lists, only a projection: a read-side program's own view of
/// events another program writes.
#[derive(annals::Event, Serialize, Deserialize)]
#[event(name = "registry.audited", alias = "registry.checked", version = 2)]
struct Audited {
    by: String,
}

#[derive(annals::Projection, Default)]
#[projection(name = "registry.audits", events(Audited, Deposited))]
#[expect(dead_code, reason = "only registered: never run")]
struct Audits;

impl annals::subscription::On<Audited> for Audits {
    async fn on(
        &mut self,
        _: Audited,
        _: &annals::subscription::Envelope,
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        Ok(())
    }
}

impl annals::subscription::On<Deposited> for Audits {
    async fn on(
        &mut self,
        _: Deposited,
        _: &annals::subscription::Envelope,
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        Ok(())
    }
}

#[test]
fn lists_every_event_and_aggregate() {
    let registry = annals::registry();
    registry.validate().unwrap();

    let opened = registry.event("account.opened").unwrap();
    assert_eq!(opened.schema_version, 1);
    assert!(
        opened.rust_type.ends_with("domain::Opened"),
        "{}",
        opened.rust_type
    );
    assert_eq!(
        registry.event("account.deposited").unwrap().schema_version,
        2
    );
    for name in <CounterEvent as Event>::NAMES {
        let info = registry.event(name).unwrap();
        assert!(info.rust_type.ends_with("domain::CounterEvent"));
    }
    assert!(registry.event("no.such.event").is_none());

    let account = registry.aggregate("account").unwrap();
    assert_eq!(
        account.events,
        ["account.opened", "account.deposited", "account.withdrawn"]
    );
    assert_eq!(account.snapshot_every, None);
    let meter = registry.aggregate("meter").unwrap();
    assert_eq!((meter.snapshot_every, meter.snapshot_version), (Some(5), 1));
    let counter = registry.aggregate("counter").unwrap();
    assert_eq!(
        counter.events,
        ["counter.incremented", "counter.added", "Reset"]
    );

    let users: Vec<&str> = registry
        .aggregates_using("account.deposited")
        .map(|a| a.name)
        .collect();
    assert_eq!(users, ["account"]);

    let names: Vec<&str> = registry.events().iter().map(|e| e.name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "events are listed by name");
    // The hand-written `MeterNextRelease` is not registered: only derived types are.
    assert_eq!(
        registry
            .aggregates()
            .iter()
            .filter(|a| a.name == "meter")
            .count(),
        1
    );
}

#[test]
fn lists_projections_and_the_events_only_they_list() {
    let registry = annals::registry();
    let audits = registry.projection("registry.audits").unwrap();
    assert_eq!(audits.events, ["registry.audited", "account.deposited"]);
    assert!(audits.rust_type.ends_with("registry::Audits"), "{audits:?}");
    let typed = registry.projection("typed").unwrap();
    assert_eq!(
        typed.events,
        [
            "account.deposited",
            "counter.incremented",
            "counter.added",
            "Reset"
        ]
    );
    let names: Vec<&str> = registry.projections().iter().map(|p| p.name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "projections are listed by name");

    // Registered through the projection alone, with its aliases and versions.
    let audited = registry.event("registry.audited").unwrap();
    assert_eq!((audited.schema_version, audited.versions.len()), (2, 2));
    assert_eq!(audited.aliases, ["registry.checked"]);
    assert!(
        audited.rust_type.ends_with("registry::Audited"),
        "{audited:?}"
    );
    assert_eq!(registry.event("registry.checked"), Some(audited));
    assert_eq!(registry.aggregates_using("registry.audited").count(), 0);
    // An event listed by an aggregate and a projection is listed once.
    let deposited = registry
        .events()
        .iter()
        .filter(|e| e.name == "account.deposited")
        .count();
    assert_eq!(deposited, 1);
    // The runtime's own tombstone, which nothing of this program lists.
    assert_eq!(
        registry.event("annals.erased").unwrap().rust_type,
        "annals::Erased"
    );
}

#[test]
fn lists_each_events_versions_and_aliases() {
    use annals::registry::{ReadAs, SchemaVersion};
    let registry = annals::registry();
    let funded = registry.event("evo.deposited").unwrap();
    assert_eq!(funded.aliases, ["evo.credited"]);
    assert_eq!(
        funded.versions,
        [
            SchemaVersion {
                version: 1,
                read: ReadAs::Json("deposited_v1")
            },
            SchemaVersion {
                version: 2,
                read: ReadAs::Typed("DepositedV2")
            },
            SchemaVersion {
                version: 3,
                read: ReadAs::Current
            },
        ]
    );
    // A former name finds the event it stands for.
    assert_eq!(registry.event("evo.credited"), Some(funded));
    // Each variant keeps its own aliases.
    assert_eq!(
        registry.event("evo.withdrawn").unwrap().aliases,
        ["evo.debited"]
    );
    assert!(registry.event("evo.frozen").unwrap().aliases.is_empty());
    // A version without a step is read unchanged as the next.
    let deposited = registry.event("account.deposited").unwrap();
    assert_eq!(
        deposited
            .versions
            .iter()
            .map(|v| v.read)
            .collect::<Vec<_>>(),
        [ReadAs::Unchanged, ReadAs::Current]
    );
}
