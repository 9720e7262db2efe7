//! The aggregate cache of a store handle: the state of recently used aggregates at a committed
//! version, so that a load reads and applies only the events after it.
//!
//! Every entry is the state rebuilt from exactly the first `version` committed events of its
//! aggregate: it comes from a full load, or from a commit that the store acknowledged (the base
//! state the context loaded, with the events it committed applied in order). Committed events
//! never change, so an entry stays true for its version whatever is committed after it; a load
//! reads the aggregate's row with the events above the entry's version in one statement, and an
//! entry whose version is above the stored one (a restore) is evicted. Entries are put only
//! through [`AggregateCache::put`], which keeps the newer of two versions.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tracing::Instrument;

use crate::aggregate::{Aggregate, AggregateId, Apply, Handles, Root};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::rebuild::rebuild_from;
use crate::store::{LoadRequest, Locate, Store};

/// A state as the cache holds it: the aggregate's own type, behind `Any`.
pub(crate) type CachedState = Box<dyn Any + Send + Sync>;

/// A copy of an entry, handed to a load.
pub(crate) struct Cached<A> {
    pub id: AggregateId,
    pub version: u64,
    pub state: A,
}

/// At most `capacity` aggregates, evicted in CLOCK order (an entry used since the hand last
/// passed it gets a second chance).
#[derive(Debug)]
pub(crate) struct AggregateCache {
    capacity: usize,
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_id: HashMap<AggregateId, Entry>,
    by_key: HashMap<(&'static str, String), AggregateId>,
    /// Ids in insertion order with the generation they were inserted at; an id whose entry was
    /// replaced or removed since is skipped when the hand reaches it.
    clock: VecDeque<(AggregateId, u64)>,
    generation: u64,
}

#[derive(Debug)]
struct Entry {
    aggregate_type: &'static str,
    key: Option<String>,
    version: u64,
    state: CachedState,
    used: bool,
    generation: u64,
}

/// What a commit hands to the cache for one aggregate.
pub(crate) struct Committed {
    pub id: AggregateId,
    pub aggregate_type: &'static str,
    pub key: Option<String>,
    pub version: u64,
    pub state: CachedState,
}

impl AggregateCache {
    /// A cache of `capacity` aggregates (at least 1).
    pub fn new(capacity: usize) -> Self {
        AggregateCache {
            capacity: capacity.max(1),
            entries: Mutex::new(Entries::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // An entry is replaced in one assignment, never left half-written: a panic elsewhere
        // while the lock was held leaves nothing to repair.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the entry for the aggregate `locate` names, if it is cached as an `A`, at or
    /// below `up_to`.
    pub fn get<A: Aggregate>(&self, locate: Locate<'_>, up_to: Option<u64>) -> Option<Cached<A>> {
        let mut entries = self.lock();
        let id = match locate {
            Locate::Id(id) => id,
            Locate::Key {
                aggregate_type,
                key,
            } => *entries.by_key.get(&(aggregate_type, key.to_owned()))?,
        };
        let entry = entries.by_id.get_mut(&id)?;
        if entry.aggregate_type != A::NAME || up_to.is_some_and(|v| entry.version > v) {
            return None;
        }
        let state = entry.state.downcast_ref::<A>()?.clone_for_cache()?;
        entry.used = true;
        Some(Cached {
            id,
            version: entry.version,
            state,
        })
    }

    /// Keeps `committed`, unless the cache holds the aggregate at a newer version already.
    pub fn put(&self, committed: Committed) {
        let mut entries = self.lock();
        if let Some(entry) = entries.by_id.get(&committed.id)
            && entry.version > committed.version
        {
            return;
        }
        entries.remove(committed.id);
        while entries.by_id.len() >= self.capacity && entries.evict_one() {}
        entries.generation += 1;
        let generation = entries.generation;
        if let Some(key) = &committed.key {
            entries
                .by_key
                .insert((committed.aggregate_type, key.clone()), committed.id);
        }
        entries.clock.push_back((committed.id, generation));
        entries.by_id.insert(
            committed.id,
            Entry {
                aggregate_type: committed.aggregate_type,
                key: committed.key,
                version: committed.version,
                state: committed.state,
                used: false,
                generation,
            },
        );
        // Replaced and removed entries leave their ids behind in the clock: drop them once
        // they outnumber the live ones.
        if entries.clock.len() > 2 * self.capacity + 16 {
            entries.compact();
        }
    }

    /// Forgets one aggregate.
    pub fn evict(&self, id: AggregateId) {
        self.lock().remove(id);
    }

    /// Forgets every aggregate.
    pub fn clear(&self) {
        *self.lock() = Entries::default();
    }

    /// How many aggregates are held.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }
}

impl Entries {
    fn remove(&mut self, id: AggregateId) {
        if let Some(entry) = self.by_id.remove(&id)
            && let Some(key) = entry.key
        {
            let key = (entry.aggregate_type, key);
            // The key may name a newer aggregate by now (after a restore): leave that one's.
            if self.by_key.get(&key) == Some(&id) {
                self.by_key.remove(&key);
            }
        }
    }

    /// Evicts the first entry the clock hand finds unused since it last passed; false when
    /// there is none left.
    fn evict_one(&mut self) -> bool {
        while let Some((id, generation)) = self.clock.pop_front() {
            let Some(entry) = self.by_id.get_mut(&id) else {
                continue;
            };
            if entry.generation != generation {
                continue;
            }
            if entry.used {
                entry.used = false;
                self.clock.push_back((id, generation));
                continue;
            }
            self.remove(id);
            return true;
        }
        false
    }

    fn compact(&mut self) {
        let by_id = &self.by_id;
        self.clock
            .retain(|(id, generation)| by_id.get(id).is_some_and(|e| e.generation == *generation));
    }
}

/// What a commit hands to the cache: the state of every changed aggregate the context kept a
/// copy of, and every changed aggregate, to evict when the commit fails.
pub(crate) struct CommitCache {
    states: Vec<Committed>,
    changed: Vec<AggregateId>,
    /// Aggregates whose key the commit changes: evicted whatever the outcome, so that no
    /// entry keeps a key they no longer have.
    rekeyed: Vec<AggregateId>,
}

impl CommitCache {
    /// The commit went through: keep the states it wrote.
    pub fn committed(self, store: &Store) {
        if let Some(cache) = &store.inner.cache {
            for state in self.states {
                cache.put(state);
            }
            for id in self.rekeyed {
                cache.evict(id);
            }
        }
    }

    /// The commit failed, its outcome is unknown, or it ran in a transaction the caller may
    /// still roll back: forget the aggregates it changed.
    pub fn discarded(self, store: &Store) {
        if let Some(cache) = &store.inner.cache {
            for id in self.changed.into_iter().chain(self.rekeyed) {
                cache.evict(id);
            }
        }
    }
}

/// [`follow`] for an event given in its stored form, applied through its `handler`.
pub(crate) fn follow_stored<A: Aggregate>(
    copy: &mut Option<CachedState>,
    root: &Root<A>,
    handler: crate::aggregate::Handler<A>,
    stored: &crate::event::StoredPayload<'_>,
) {
    let applied = match copy.as_mut().and_then(|c| c.downcast_mut::<A>()) {
        // The root decoded and applied it already: the copy does too.
        Some(state) => handler(state, stored).is_ok(),
        None => false,
    };
    if !applied {
        *copy = root
            .state
            .clone_for_cache()
            .map(|s| Box::new(s) as CachedState);
    }
}

/// Keeps the context's copy of an aggregate's state in step with `root`, after `event` was
/// applied to it and staged. The first event makes the copy (a clone of the root); later ones
/// are applied to it too.
pub(crate) fn follow<A, E>(copy: &mut Option<CachedState>, root: &Root<A>, event: &E)
where
    A: Handles<E>,
    E: Event,
{
    match copy.as_mut().and_then(|c| c.downcast_mut::<A>()) {
        Some(state) => <A as Apply<E>>::apply(state, event),
        None => {
            *copy = root
                .state
                .clone_for_cache()
                .map(|s| Box::new(s) as CachedState)
        }
    }
}

impl Context {
    /// The copies of state this context kept for the cache, taken before the commit; `None`
    /// when the store has no cache.
    pub(crate) fn take_cached(&mut self) -> Option<CommitCache> {
        self.store.inner.cache.as_ref()?;
        let mut states = Vec::new();
        let mut changed = Vec::new();
        let mut rekeyed = Vec::new();
        for t in self.tracked.iter_mut() {
            if t.rekey.is_some() {
                rekeyed.push(t.id);
                continue;
            }
            if t.events.is_empty() {
                continue;
            }
            changed.push(t.id);
            if let Some(state) = t.cached.take() {
                states.push(Committed {
                    id: t.id,
                    aggregate_type: t.aggregate_type,
                    key: t.key.clone(),
                    version: t.base + t.events.len() as u64,
                    state,
                });
            }
        }
        Some(CommitCache {
            states,
            changed,
            rekeyed,
        })
    }

    /// Loads an aggregate the cache holds: its row and the events after the cached version, in
    /// one request, applied to a clone of the cached state. `None` when the cache cannot answer
    /// (the aggregate is not cached, or the store disagrees with the entry, which is then
    /// evicted): the caller loads in full.
    pub(crate) async fn fetch_cached<A: Aggregate>(
        &self,
        locate: Locate<'_>,
        up_to: Option<u64>,
    ) -> Result<Option<Option<Root<A>>>> {
        let Some(cache) = &self.store.inner.cache else {
            return Ok(None);
        };
        let Some(cached) = cache.get::<A>(locate, up_to) else {
            return Ok(None);
        };
        let span = tracing::debug_span!(
            "annals.load",
            aggregate_type = A::NAME,
            aggregate = %cached.id,
            cached_version = cached.version,
            version = tracing::field::Empty,
            events = tracing::field::Empty,
        );
        let request = LoadRequest {
            locate,
            snapshot_version: None,
            up_to,
            after: Some(cached.version),
        };
        let Some(stream) = self
            .store
            .inner
            .backend
            .load(request)
            .instrument(span.clone())
            .await?
        else {
            cache.evict(cached.id);
            return Ok(None);
        };
        let row = &stream.row;
        if row.erased {
            cache.evict(cached.id);
            return Ok(None);
        }
        let expected = up_to.map_or(row.version, |v| v.min(row.version));
        // The store is behind the entry (restored from a backup), or the key now names another
        // aggregate: the entry is not this aggregate's history.
        if row.id != cached.id || row.version < cached.version {
            tracing::debug!(
                aggregate = %cached.id,
                cached = cached.version,
                stored = row.version,
                "cached aggregate is ahead of the store; loading it in full"
            );
            cache.evict(cached.id);
            return Ok(None);
        }
        let from = cached.version;
        let root = match rebuild_from(&stream, from, cached.state) {
            Ok(root) if root.version == expected => root,
            Ok(_)
            | Err(Error::Corrupt(_))
            | Err(Error::EventsPruned { .. })
            | Err(Error::WrongAggregateType { .. }) => {
                cache.evict(cached.id);
                return Ok(None);
            }
            Err(e) => {
                cache.evict(cached.id);
                return Err(e);
            }
        };
        span.record("version", root.version);
        span.record("events", stream.events.len());
        if root.version > from {
            remember(cache, &root);
        }
        Ok(Some(Some(root)))
    }

    /// Keeps a root a full load rebuilt from the store, when the store has a cache.
    pub(crate) fn remember<A: Aggregate>(&self, loaded: &Option<Root<A>>) {
        if let (Some(cache), Some(root)) = (&self.store.inner.cache, loaded) {
            remember(cache, root);
        }
    }
}

fn remember<A: Aggregate>(cache: &AggregateCache, root: &Root<A>) {
    if let Some(state) = root.state.clone_for_cache() {
        cache.put(Committed {
            id: root.id,
            aggregate_type: A::NAME,
            key: root.key.clone(),
            version: root.version,
            state: Box::new(state),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Clone)]
    struct Count(u64);

    impl Aggregate for Count {
        const NAME: &'static str = "cache.count";
        const SNAPSHOT_EVERY: Option<u64> = None;
        const SNAPSHOT_VERSION: u32 = 1;

        fn handler(_: &str) -> Option<crate::aggregate::Handler<Self>> {
            None
        }

        fn encode_snapshot(&self) -> Option<crate::error::Result<Vec<u8>>> {
            None
        }

        fn decode_snapshot(_: &[u8], _: u64) -> crate::error::Result<Self> {
            Ok(Count(0))
        }

        fn clone_for_cache(&self) -> Option<Self> {
            Some(self.clone())
        }
    }

    fn put(cache: &AggregateCache, id: AggregateId, key: Option<&str>, version: u64) {
        cache.put(Committed {
            id,
            aggregate_type: Count::NAME,
            key: key.map(str::to_owned),
            version,
            state: Box::new(Count(version)),
        });
    }

    fn version(cache: &AggregateCache, id: AggregateId) -> Option<u64> {
        cache.get::<Count>(Locate::Id(id), None).map(|c| c.state.0)
    }

    #[test]
    fn keeps_the_newer_version() {
        let cache = AggregateCache::new(4);
        let id = AggregateId::new();
        put(&cache, id, None, 5);
        put(&cache, id, None, 3);
        assert_eq!(version(&cache, id), Some(5));
        put(&cache, id, None, 6);
        assert_eq!(version(&cache, id), Some(6));
        assert!(cache.get::<Count>(Locate::Id(id), Some(5)).is_none());
    }

    #[test]
    fn finds_by_key_until_evicted() {
        let cache = AggregateCache::new(4);
        let id = AggregateId::new();
        put(&cache, id, Some("k"), 2);
        let by_key = Locate::Key {
            aggregate_type: Count::NAME,
            key: "k",
        };
        assert_eq!(cache.get::<Count>(by_key, None).map(|c| c.id), Some(id));
        cache.evict(id);
        assert!(cache.get::<Count>(by_key, None).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_key_taken_over_by_another_aggregate_stays_with_it() {
        let cache = AggregateCache::new(4);
        let (old, new) = (AggregateId::new(), AggregateId::new());
        put(&cache, old, Some("k"), 2);
        put(&cache, new, Some("k"), 1);
        cache.evict(old);
        let by_key = Locate::Key {
            aggregate_type: Count::NAME,
            key: "k",
        };
        assert_eq!(cache.get::<Count>(by_key, None).map(|c| c.id), Some(new));
    }

    #[test]
    fn holds_at_most_its_capacity_and_spares_used_entries() {
        let cache = AggregateCache::new(3);
        let ids: Vec<AggregateId> = (0..3).map(|_| AggregateId::new()).collect();
        for id in &ids {
            put(&cache, *id, None, 1);
        }
        // The first is used: the hand spares it and evicts the second.
        assert!(version(&cache, ids[0]).is_some());
        put(&cache, AggregateId::new(), None, 1);
        assert_eq!(cache.len(), 3);
        assert!(version(&cache, ids[0]).is_some());
        assert!(version(&cache, ids[1]).is_none());
        for _ in 0..100 {
            put(&cache, AggregateId::new(), None, 1);
            put(&cache, ids[2], None, 1);
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.lock().clock.len() <= 2 * 3 + 16);
    }
}
