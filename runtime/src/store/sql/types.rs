//! The type-name cache both SQL stores keep: event and aggregate type names are stored once, in
//! two small tables, and every event row refers to its type by integer id.
//!
//! A store reads both tables at open (after writing every registered name) and keeps them here.
//! Another process may add a name later: a store that meets an id it does not know re-reads the
//! table **over the connection it already holds** (a second checkout could wait on a pool the
//! caller itself exhausts) and replaces the map with [`TypeCache::set`]. Maps are replaced whole,
//! never changed in place, so readers take an `Arc` and use it without a lock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::Error;

/// Which of the two type tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TypeKind {
    Aggregate,
    Event,
}

impl TypeKind {
    fn noun(self) -> &'static str {
        match self {
            TypeKind::Aggregate => "aggregate",
            TypeKind::Event => "event",
        }
    }
}

/// One type table's contents, both ways. Names are shared as `Arc<str>`, so a load hands them
/// to every event without an allocation.
#[derive(Debug, Default)]
pub(crate) struct TypeMap {
    by_name: HashMap<Arc<str>, i64>,
    by_id: HashMap<i64, Arc<str>>,
}

impl TypeMap {
    /// The map of a table's `(id, name)` rows.
    pub fn from_rows(rows: impl IntoIterator<Item = (i64, String)>) -> TypeMap {
        let mut map = TypeMap::default();
        for (id, name) in rows {
            let name: Arc<str> = Arc::from(name);
            map.by_name.insert(name.clone(), id);
            map.by_id.insert(id, name);
        }
        map
    }

    /// The id of `name`, if the table has it.
    pub fn id(&self, name: &str) -> Option<i64> {
        self.by_name.get(name).copied()
    }

    /// The name of `id`, if the table has it.
    pub fn name(&self, id: i64) -> Option<&Arc<str>> {
        self.by_id.get(&id)
    }

    /// True when every id is in the map: a map that lacks one must be re-read.
    pub fn has_ids(&self, mut ids: impl Iterator<Item = i64>) -> bool {
        ids.all(|id| self.by_id.contains_key(&id))
    }

    /// The name of `id`, or the error for a row that names a type the table does not hold even
    /// after a re-read.
    pub fn name_of(&self, kind: TypeKind, id: i64) -> Result<Arc<str>, Error> {
        self.name(id).cloned().ok_or_else(|| {
            let noun = kind.noun();
            Error::Corrupt(format!(
                "{noun} type id {id} is not in the {noun} type table"
            ))
        })
    }

    /// The id of `name`, or the error for a name that was just written and still has none.
    pub fn id_of(&self, name: &str) -> Result<i64, Error> {
        self.id(name)
            .ok_or_else(|| Error::Corrupt(format!("type {name:?} has no id after it was written")))
    }
}

/// The cached contents of the two type tables of one store.
#[derive(Debug, Default)]
pub(crate) struct TypeCache {
    aggregates: RwLock<Arc<TypeMap>>,
    events: RwLock<Arc<TypeMap>>,
}

impl TypeCache {
    fn slot(&self, kind: TypeKind) -> &RwLock<Arc<TypeMap>> {
        match kind {
            TypeKind::Aggregate => &self.aggregates,
            TypeKind::Event => &self.events,
        }
    }

    /// The current map of `kind`.
    pub fn get(&self, kind: TypeKind) -> Arc<TypeMap> {
        // Maps are replaced whole: a poisoned lock still holds a complete map.
        self.slot(kind)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the map of `kind` with a fresh read of its table, and returns it.
    pub fn set(&self, kind: TypeKind, map: TypeMap) -> Arc<TypeMap> {
        let map = Arc::new(map);
        *self.slot(kind).write().unwrap_or_else(|e| e.into_inner()) = map.clone();
        map
    }
}

/// The distinct names among `names`, in first-seen order: what a store writes to a type table.
pub(crate) fn distinct<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = std::collections::HashSet::new();
    names.into_iter().filter(|n| seen.insert(*n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways_and_reports_what_is_missing() {
        let cache = TypeCache::default();
        assert!(cache.get(TypeKind::Event).id("opened").is_none());
        let map = cache.set(
            TypeKind::Event,
            TypeMap::from_rows([(1, "opened".to_owned()), (2, "closed".to_owned())]),
        );
        assert_eq!(map.id("closed"), Some(2));
        assert_eq!(map.name(1).map(|n| &**n), Some("opened"));
        assert!(map.has_ids([1, 2].into_iter()));
        assert!(!map.has_ids([1, 3].into_iter()));
        assert!(matches!(
            map.name_of(TypeKind::Event, 3),
            Err(Error::Corrupt(m)) if m == "event type id 3 is not in the event type table"
        ));
        // The aggregate map is apart from the event map.
        assert!(cache.get(TypeKind::Aggregate).name(1).is_none());
        assert_eq!(distinct(["a", "b", "a", "c", "b"]), ["a", "b", "c"]);
    }
}
