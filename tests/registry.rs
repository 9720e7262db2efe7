//! The registry as users inspect it.

mod conformance;

use annals::Event;
use conformance::domain::*;

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
