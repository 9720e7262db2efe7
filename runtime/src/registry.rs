//! The compile-time registry of the program's aggregate, projection and event types.
//!
//! Each `#[derive(Aggregate)]` and `#[derive(Projection)]` submits a registration through
//! `inventory`, which carries the registration of every event type it lists (what
//! `#[derive(Event)]` puts in [`Event`](crate::Event)'s hidden `REGISTRATION` constant). An
//! event type is registered by the aggregates that apply it and the projections that handle
//! it, with no `inventory` item of its own, which keeps the derive cheap to compile: an event
//! type that no aggregate or projection of the program lists is not in the registry (nothing
//! of the program writes it, and no derived projection reads it). [`registry`] gathers them
//! into one inspectable list, and [`Registry::validate`] (run by every
//! [`Store::open`](crate::Store::open)) refuses two Rust types under one name.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// What the registry holds of one event type: `#[derive(Event)]` writes it as the type's
/// `Event::REGISTRATION`.
#[doc(hidden)]
#[derive(Debug)]
pub struct EventRegistration {
    pub names: &'static [&'static str],
    /// Former names.
    pub aliases: &'static [&'static str],
    /// The current name each of `aliases` stands for, in the same order.
    pub alias_of: &'static [&'static str],
    pub version: u32,
    pub upcasts: &'static [UpcastRegistration],
    /// The type's path, for messages; empty for a type implementing `Event` by hand, whose
    /// path comes from the aggregates' and projections' lists that name it.
    pub rust_type: &'static str,
    /// The type itself: what tells two types with one path apart.
    pub type_id: TypeId,
}

impl EventRegistration {
    /// What a registration leaves out is taken from here (`..EventRegistration::NONE`): no
    /// aliases and no upcast steps. One constant for every event type, where empty slices
    /// written out in each registration would each be one more constant to evaluate per type.
    pub const NONE: EventRegistration = EventRegistration {
        names: &[],
        aliases: &[],
        alias_of: &[],
        version: 1,
        upcasts: &[],
        rust_type: "",
        type_id: TypeId::of::<()>(),
    };

    /// The registration of an event type `E` that implements `Event` by hand: its names and
    /// version, with no aliases or upcast steps of record.
    pub const fn by_hand<E: 'static>(names: &'static [&'static str], version: u32) -> Self {
        EventRegistration {
            names,
            version,
            type_id: TypeId::of::<E>(),
            ..EventRegistration::NONE
        }
    }
}

/// One declared upcast step of an event type.
#[doc(hidden)]
#[derive(Debug)]
pub struct UpcastRegistration {
    pub from: u32,
    /// True for a typed step, false for a step on the JSON value.
    pub typed: bool,
    /// The step's type or function, as written.
    pub path: &'static str,
}

/// One event type in an aggregate's `events(...)` list.
#[doc(hidden)]
#[derive(Debug)]
pub struct ListedEvent {
    /// The event type's registration.
    pub registration: &'static EventRegistration,
    /// The type as the list spells it, for a type implementing `Event` by hand.
    pub rust_type: &'static str,
}

/// What `#[derive(Aggregate)]` submits for one aggregate type, with its events'.
#[doc(hidden)]
pub struct AggregateRegistration {
    pub name: &'static str,
    /// The type's path, for messages.
    pub rust_type: &'static str,
    pub snapshot_every: Option<u64>,
    pub snapshot_version: u32,
    pub events: &'static [ListedEvent],
}

/// What `#[derive(Projection)]` submits for one projection type, with its events'.
#[doc(hidden)]
pub struct ProjectionRegistration {
    /// The subscription's name.
    pub name: &'static str,
    /// The type's path, for messages.
    pub rust_type: &'static str,
    pub events: &'static [ListedEvent],
}

// The runtime's own events, which no aggregate lists (`annals.erased`).
inventory::collect!(EventRegistration);
inventory::collect!(AggregateRegistration);
inventory::collect!(ProjectionRegistration);

/// One registered event name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventInfo {
    /// The name stored with each event.
    pub name: &'static str,
    /// Former names that events stored earlier carry, read as this one.
    pub aliases: Vec<&'static str>,
    /// The schema version written with new events.
    pub schema_version: u32,
    /// How each schema version from 1 up to `schema_version` is read, in order.
    pub versions: Vec<SchemaVersion>,
    /// The Rust type's path (for an enum: the enum; each variant has its own name).
    pub rust_type: &'static str,
}

/// How events stored with one schema version are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaVersion {
    /// The stored schema version.
    pub version: u32,
    /// What a read does with it.
    pub read: ReadAs,
}

/// What a read does with an event of one schema version (see [`SchemaVersion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAs {
    /// The current version: decoded as the type.
    Current,
    /// Decoded as the next version, unchanged (a field added with a serde default, say).
    Unchanged,
    /// Decoded as this older type, which converts into the next version with `From`.
    Typed(&'static str),
    /// Edited by this function on the JSON value into the next version.
    Json(&'static str),
}

/// One registered aggregate type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateInfo {
    /// The name stored with each aggregate.
    pub name: &'static str,
    /// The Rust type's path.
    pub rust_type: &'static str,
    /// Snapshot policy: one snapshot every this many events.
    pub snapshot_every: Option<u64>,
    /// The shape version of its snapshots.
    pub snapshot_version: u32,
    /// The names of the events it applies, in the order listed.
    pub events: Vec<&'static str>,
}

/// One registered projection type (`#[derive(Projection)]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionInfo {
    /// The name of its subscription.
    pub name: &'static str,
    /// The Rust type's path.
    pub rust_type: &'static str,
    /// The names of the events it handles, in the order listed.
    pub events: Vec<&'static str>,
}

/// Every aggregate and projection type linked into this program, and every event type they
/// list.
#[derive(Debug)]
pub struct Registry {
    events: Vec<EventInfo>,
    /// The Rust type of each of `events`.
    event_types: Vec<TypeId>,
    aggregates: Vec<AggregateInfo>,
    projections: Vec<ProjectionInfo>,
}

/// The registry of this program, gathered once.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::gather)
}

impl Registry {
    fn gather() -> Registry {
        let mut regs: Vec<&AggregateRegistration> = inventory::iter::<AggregateRegistration>
            .into_iter()
            .collect();
        regs.sort_by_key(|r| (r.name, r.rust_type));
        let mut projection_regs: Vec<&ProjectionRegistration> =
            inventory::iter::<ProjectionRegistration>
                .into_iter()
                .collect();
        projection_regs.sort_by_key(|r| (r.name, r.rust_type));
        let listed = regs
            .iter()
            .flat_map(|r| r.events)
            .chain(projection_regs.iter().flat_map(|r| r.events))
            .map(|e| (e.registration, e.rust_type));
        let own = inventory::iter::<EventRegistration>
            .into_iter()
            .map(|r| (r, r.rust_type));
        let mut events: Vec<(EventInfo, TypeId)> = own
            .chain(listed)
            .flat_map(|(r, listed_as)| {
                let rust_type = if r.rust_type.is_empty() {
                    listed_as
                } else {
                    r.rust_type
                };
                r.names.iter().map(move |name| {
                    let info = EventInfo {
                        name,
                        aliases: r
                            .aliases
                            .iter()
                            .zip(r.alias_of)
                            .filter(|(_, of)| *of == name)
                            .map(|(alias, _)| *alias)
                            .collect(),
                        schema_version: r.version,
                        versions: versions(r),
                        rust_type,
                    };
                    (info, r.type_id)
                })
            })
            .collect();
        // One entry per name and type, however many aggregates list the type.
        events.sort_by(|(a, a_type), (b, b_type)| {
            (a.name, a_type, a.rust_type).cmp(&(b.name, b_type, b.rust_type))
        });
        events.dedup_by(|(a, a_type), (b, b_type)| a.name == b.name && a_type == b_type);
        let (events, event_types) = events.into_iter().unzip();

        let aggregates = regs
            .into_iter()
            .map(|r| AggregateInfo {
                name: r.name,
                rust_type: r.rust_type,
                snapshot_every: r.snapshot_every,
                snapshot_version: r.snapshot_version,
                events: names(r.events),
            })
            .collect();
        let projections = projection_regs
            .into_iter()
            .map(|r| ProjectionInfo {
                name: r.name,
                rust_type: r.rust_type,
                events: names(r.events),
            })
            .collect();
        Registry {
            events,
            event_types,
            aggregates,
            projections,
        }
    }

    /// Every registered event name, sorted by name.
    pub fn events(&self) -> &[EventInfo] {
        &self.events
    }

    /// Every registered aggregate type, sorted by name.
    pub fn aggregates(&self) -> &[AggregateInfo] {
        &self.aggregates
    }

    /// The event registered under `name`, or with `name` among its aliases.
    pub fn event(&self, name: &str) -> Option<&EventInfo> {
        self.events
            .iter()
            .find(|e| e.name == name)
            .or_else(|| self.events.iter().find(|e| e.aliases.contains(&name)))
    }

    /// `name` as the registry holds it, when it is a registered name or alias.
    pub(crate) fn static_name(&self, name: &str) -> Option<&'static str> {
        let info = self.event(name)?;
        std::iter::once(info.name)
            .chain(info.aliases.iter().copied())
            .find(|n| *n == name)
    }

    /// Every registered projection type, sorted by name.
    pub fn projections(&self) -> &[ProjectionInfo] {
        &self.projections
    }

    /// The projection type whose subscription is named `name`.
    pub fn projection(&self, name: &str) -> Option<&ProjectionInfo> {
        self.projections.iter().find(|p| p.name == name)
    }

    /// The aggregate type registered under `name`.
    pub fn aggregate(&self, name: &str) -> Option<&AggregateInfo> {
        self.aggregates.iter().find(|a| a.name == name)
    }

    /// The aggregate types that list the event `name`.
    pub fn aggregates_using(&self, event_name: &str) -> impl Iterator<Item = &AggregateInfo> {
        self.aggregates
            .iter()
            .filter(move |a| a.events.contains(&event_name))
    }

    /// Checks that every event name and alias belongs to one Rust type (one name, for an
    /// alias), every aggregate name to one aggregate type, and every projection's subscription
    /// name to one projection type (two would share one position). Run by
    /// [`Store::open`](crate::Store::open).
    pub fn validate(&self) -> Result<()> {
        let events = || self.events.iter().zip(&self.event_types);
        let mut seen: BTreeMap<&str, (&str, TypeId)> = BTreeMap::new();
        for (e, type_id) in events() {
            if let Some((first, first_id)) = seen.insert(e.name, (e.rust_type, *type_id))
                && first_id != *type_id
            {
                return Err(collision("event", e.name, first, e.rust_type));
            }
        }
        let mut aliases: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for e in &self.events {
            for alias in &e.aliases {
                if let Some((owner, _)) = seen.get(alias) {
                    return Err(collision("event", alias, owner, e.rust_type));
                }
                if let Some((name, rust_type)) = aliases.insert(alias, (e.name, e.rust_type))
                    && name != e.name
                {
                    return Err(collision("event", alias, rust_type, e.rust_type));
                }
            }
        }
        let aggregates = self.aggregates.iter().map(|a| (a.name, a.rust_type));
        unique("aggregate", aggregates)?;
        let projections = self.projections.iter().map(|p| (p.name, p.rust_type));
        unique("projection", projections)?;
        Ok(())
    }
}

/// Refuses two types of one kind under one name; `types` yields (name, Rust type).
fn unique<'a>(kind: &'static str, types: impl Iterator<Item = (&'a str, &'a str)>) -> Result<()> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, rust_type) in types {
        if let Some(first) = seen.insert(name, rust_type) {
            return Err(collision(kind, name, first, rust_type));
        }
    }
    Ok(())
}

/// The names of the listed event types, in the order listed.
fn names(events: &[ListedEvent]) -> Vec<&'static str> {
    events
        .iter()
        .flat_map(|e| e.registration.names.iter().copied())
        .collect()
}

/// How each schema version of a registration is read.
fn versions(r: &EventRegistration) -> Vec<SchemaVersion> {
    (1..=r.version)
        .map(|version| SchemaVersion {
            version,
            read: if version == r.version {
                ReadAs::Current
            } else {
                match r.upcasts.iter().find(|u| u.from == version) {
                    Some(u) if u.typed => ReadAs::Typed(u.path),
                    Some(u) => ReadAs::Json(u.path),
                    None => ReadAs::Unchanged,
                }
            },
        })
        .collect()
}

fn collision(kind: &'static str, name: &str, first: &str, second: &str) -> Error {
    let (first, second) = if first <= second {
        (first, second)
    } else {
        (second, first)
    };
    Error::TypeNameCollision {
        kind,
        name: name.to_owned(),
        first: first.to_owned(),
        second: second.to_owned(),
    }
}
