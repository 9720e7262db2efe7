//! Which events a filtered feed read, a live stream or a subscription takes.

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, AggregateId};
use crate::error::{Error, Result};
use crate::event::Event;

/// Which events of the global feed to take: by event type, by aggregate type, one aggregate by
/// id, or one aggregate by its natural key. Conditions of different kinds must all hold; the
/// names listed for one kind are alternatives. [`Filter::all`] takes every event.
///
/// The store applies a filter in its own query (SQL on SQLite and PostgreSQL): events that do
/// not match are never read out of the database, and a reader's cursor still moves past them
/// (see [`FeedPage::scanned`](crate::FeedPage::scanned)), so a sparse filter never reads the same
/// stretch of the feed twice.
///
/// ```
/// # use annals::prelude::*;
/// # use annals::Filter;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Event, Serialize, Deserialize)]
/// # #[event(name = "doc.filter.deposited")]
/// # struct Deposited { amount: i64 }
/// # #[derive(Aggregate, Default)]
/// # #[aggregate(name = "doc.filter.account", events(Deposited))]
/// # struct Account;
/// # impl Apply<Deposited> for Account { fn apply(&mut self, _: &Deposited) {} }
/// // Deposits to accounts, of any account.
/// let deposits = Filter::all().aggregate_type::<Account>().event::<Deposited>();
/// // Every event of the account with the key "alice".
/// let alice = Filter::all().key::<Account>("alice");
/// # let _ = (deposits, alice);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    aggregate_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aggregate: Option<AggregateId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// One partition of a partitioned subscription: `(partition, partitions)`. Not stored
    /// with the filter: each worker reads its partitions with it.
    #[serde(skip)]
    partition: Option<(u32, u32)>,
}

impl Filter {
    /// Every event.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Also takes the events stored under `E`'s names (every variant's, for an enum event) and
    /// its aliases.
    pub fn event<E: Event>(self) -> Filter {
        E::NAMES
            .iter()
            .chain(E::ALIASES)
            .fold(self, |filter, name| filter.event_named(name))
    }

    /// Also takes the events stored under the registered name `name`.
    pub fn event_named(mut self, name: &str) -> Filter {
        if !self.event_types.iter().any(|n| n == name) {
            self.event_types.push(name.to_owned());
            self.event_types.sort();
        }
        self
    }

    /// Also takes the events of aggregates of type `A`.
    pub fn aggregate_type<A: Aggregate>(self) -> Filter {
        self.aggregate_type_named(A::NAME)
    }

    /// Also takes the events of aggregates of the registered type `name`.
    pub fn aggregate_type_named(mut self, name: &str) -> Filter {
        if !self.aggregate_types.iter().any(|n| n == name) {
            self.aggregate_types.push(name.to_owned());
            self.aggregate_types.sort();
        }
        self
    }

    /// Only the events of the aggregate `id`.
    pub fn aggregate(mut self, id: AggregateId) -> Filter {
        self.aggregate = Some(id);
        self
    }

    /// Only the events of the aggregate of type `A` whose natural key is `key` (compared byte
    /// for byte). Events written before the aggregate had the key match as well: the key
    /// names the aggregate, not the events.
    pub fn key<A: Aggregate>(self, key: &str) -> Filter {
        self.key_named(A::NAME, key)
    }

    /// [`key`](Filter::key) with the aggregate type given by its registered name.
    pub fn key_named(mut self, aggregate_type: &str, key: &str) -> Filter {
        self.aggregate_types = vec![aggregate_type.to_owned()];
        self.key = Some(key.to_owned());
        self
    }

    /// Only the events of aggregates in `partition` of `partitions` (at most 256): an
    /// aggregate's partition is the last byte of its id modulo `partitions`, the same in every
    /// store, so all of an aggregate's events fall in one partition.
    pub(crate) fn in_partition(mut self, partition: u32, partitions: u32) -> Filter {
        self.partition = (partitions > 1).then_some((partition, partitions));
        self
    }

    /// The partition condition, if any: `(partition, partitions)`.
    #[cfg_attr(
        not(any(feature = "memory", feature = "sqlite", feature = "postgres")),
        allow(dead_code)
    )]
    pub(crate) fn partition(&self) -> Option<(u32, u32)> {
        self.partition
    }

    /// True when the filter takes every event.
    pub fn is_all(&self) -> bool {
        self == &Filter::default()
    }

    /// The event type names listed (empty: any).
    pub fn event_types(&self) -> &[String] {
        &self.event_types
    }

    /// The aggregate type names listed (empty: any).
    pub fn aggregate_types(&self) -> &[String] {
        &self.aggregate_types
    }

    /// The one aggregate taken, if the filter names one by id.
    pub fn aggregate_id(&self) -> Option<AggregateId> {
        self.aggregate
    }

    /// The natural key of the one aggregate taken, if the filter names one by key.
    pub fn aggregate_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// True when `event`'s event type and aggregate type pass the filter (the conditions on one
    /// aggregate and on partitions are not looked at).
    pub(crate) fn admits(&self, event: &crate::event::RecordedEvent) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
            && (self.aggregate_types.is_empty()
                || self.aggregate_types.contains(&event.aggregate_type))
    }

    /// Which conditions are present, for the stores that render one statement per shape.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn shape(&self) -> FilterShape {
        FilterShape {
            event_types: !self.event_types.is_empty(),
            aggregate_types: !self.aggregate_types.is_empty(),
            aggregate: self.aggregate.is_some(),
            key: self.key.is_some(),
            partition: self.partition.is_some(),
        }
    }

    /// Refuses a filter a store cannot run: a key without its aggregate type.
    pub(crate) fn check(&self) -> Result<()> {
        if self.key.is_some() && self.aggregate_types.len() != 1 {
            return Err(Error::Config(
                "a filter by natural key needs exactly one aggregate type".to_owned(),
            ));
        }
        Ok(())
    }

    /// The filter as stored with a durable subscription.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Which conditions a [`Filter`] has: each shape is one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) struct FilterShape {
    pub event_types: bool,
    pub aggregate_types: bool,
    pub aggregate: bool,
    pub key: bool,
    pub partition: bool,
}

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
impl FilterShape {
    /// How many shapes there are.
    pub const COUNT: usize = 32;

    /// The shape's index in `0..COUNT`.
    pub fn index(self) -> usize {
        usize::from(self.event_types)
            | usize::from(self.aggregate_types) << 1
            | usize::from(self.aggregate) << 2
            | usize::from(self.key) << 3
            | usize::from(self.partition) << 4
    }

    /// The shape with index `index`.
    pub fn from_index(index: usize) -> FilterShape {
        FilterShape {
            event_types: index & 1 != 0,
            aggregate_types: index & 2 != 0,
            aggregate: index & 4 != 0,
            key: index & 8 != 0,
            partition: index & 16 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_once_and_sorted() {
        let f = Filter::all()
            .event_named("b")
            .event_named("a")
            .event_named("b");
        assert_eq!(f.event_types(), ["a", "b"]);
        assert!(!f.is_all());
        assert!(Filter::all().is_all());
    }

    #[test]
    fn a_filter_survives_json() {
        let f = Filter::all().event_named("x").key_named("account", "alice");
        let back: Filter = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(back, f);
        assert_eq!(Filter::all().to_json(), "{}");
    }

    #[test]
    fn shapes_have_distinct_indexes() {
        for index in 0..FilterShape::COUNT {
            assert_eq!(FilterShape::from_index(index).index(), index);
        }
    }

    #[test]
    fn a_key_needs_one_aggregate_type() {
        assert!(Filter::all().key_named("a", "k").check().is_ok());
        let two = Filter::all().key_named("a", "k").aggregate_type_named("b");
        assert!(matches!(two.check(), Err(Error::Config(_))));
    }
}
