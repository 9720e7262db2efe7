//! The compile-time registry of every event and aggregate type.
//!
//! Each `#[derive(Event)]` and `#[derive(Aggregate)]` submits a registration through
//! `inventory`; [`registry`] gathers them into one inspectable list, and
//! [`Registry::validate`] (run by every [`Store::open`](crate::Store::open)) refuses two Rust
//! types under one name and aggregates that list unregistered events.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// What `#[derive(Event)]` submits for one event type.
#[doc(hidden)]
pub struct EventRegistration {
    pub names: &'static [&'static str],
    /// `(alias, name)`: each former name and the current name it stands for.
    pub aliases: &'static [(&'static str, &'static str)],
    pub version: u32,
    pub upcasts: &'static [UpcastRegistration],
    /// The type's path, for messages.
    pub rust_type: &'static str,
    /// The type itself: what tells two types with one path apart.
    pub type_id: TypeId,
}

/// One declared upcast step of an event type.
#[doc(hidden)]
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
    pub names: &'static [&'static str],
    /// The type as the list spells it, for messages.
    pub rust_type: &'static str,
    pub type_id: TypeId,
}

/// What `#[derive(Aggregate)]` submits for one aggregate type.
#[doc(hidden)]
pub struct AggregateRegistration {
    pub name: &'static str,
    /// The type's path, for messages.
    pub rust_type: &'static str,
    pub snapshot_every: Option<u64>,
    pub snapshot_version: u32,
    pub events: &'static [ListedEvent],
}

inventory::collect!(EventRegistration);
inventory::collect!(AggregateRegistration);

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

/// Every event and aggregate type linked into this program.
#[derive(Debug)]
pub struct Registry {
    events: Vec<EventInfo>,
    /// The Rust type of each of `events`.
    event_types: Vec<TypeId>,
    aggregates: Vec<AggregateInfo>,
    /// Each name an aggregate lists: (the aggregate's index, the name, the listed type).
    listed: Vec<(usize, &'static str, &'static ListedEvent)>,
}

/// The registry of this program, gathered once.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::gather)
}

impl Registry {
    fn gather() -> Registry {
        let mut events: Vec<(EventInfo, TypeId)> = inventory::iter::<EventRegistration>
            .into_iter()
            .flat_map(|r| {
                r.names.iter().map(move |name| {
                    let info = EventInfo {
                        name,
                        aliases: r
                            .aliases
                            .iter()
                            .filter(|(_, of)| of == name)
                            .map(|(alias, _)| *alias)
                            .collect(),
                        schema_version: r.version,
                        versions: versions(r),
                        rust_type: r.rust_type,
                    };
                    (info, r.type_id)
                })
            })
            .collect();
        events.sort_by(|(a, a_type), (b, b_type)| {
            (a.name, a.rust_type, a_type).cmp(&(b.name, b.rust_type, b_type))
        });
        events.dedup();
        let (events, event_types) = events.into_iter().unzip();

        let mut aggregates = Vec::new();
        let mut listed = Vec::new();
        let mut regs: Vec<&AggregateRegistration> = inventory::iter::<AggregateRegistration>
            .into_iter()
            .collect();
        regs.sort_by_key(|r| (r.name, r.rust_type));
        for (index, r) in regs.into_iter().enumerate() {
            for e in r.events {
                for name in e.names {
                    listed.push((index, *name, e));
                }
            }
            aggregates.push(AggregateInfo {
                name: r.name,
                rust_type: r.rust_type,
                snapshot_every: r.snapshot_every,
                snapshot_version: r.snapshot_version,
                events: r
                    .events
                    .iter()
                    .flat_map(|e| e.names.iter().copied())
                    .collect(),
            });
        }
        Registry {
            events,
            event_types,
            aggregates,
            listed,
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

    /// Checks that every name and alias belongs to one Rust type (one name, for an alias)
    /// and that every event an aggregate lists is registered. Run by
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
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for a in &self.aggregates {
            if let Some(first) = seen.insert(a.name, a.rust_type) {
                return Err(collision("aggregate", a.name, first, a.rust_type));
            }
        }
        for (index, name, listed) in &self.listed {
            let registered =
                events().any(|(e, type_id)| e.name == *name && *type_id == listed.type_id);
            if !registered {
                let aggregate_type = self
                    .aggregates
                    .get(*index)
                    .map_or_else(String::new, |a| a.name.to_owned());
                return Err(Error::UnregisteredEvent {
                    aggregate_type,
                    event_type: listed.rust_type.to_owned(),
                });
            }
        }
        Ok(())
    }
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
