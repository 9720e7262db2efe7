//! The in-memory store (`memory:`), for tests: the same semantics as the SQL stores, including
//! all-or-nothing commits and typed conflicts, kept in one process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::FeedPage;
use crate::filter::Filter;
use crate::metadata::Metadata;
use crate::registry::Registry;
use crate::store::{
    AggregateRow, Backend, BoxFuture, CommitBatch, CommitSignal, LoadRequest, LoadedStream, Locate,
    Prune, StoreOptions, StoredSnapshot, StreamEvent, StreamRange,
};
use crate::subscription::row::{Claim, Parked, Row, Spec, Write, cursor_text};
use crate::subscription::tx::TxState;

struct StoredEvent {
    aggregate_id: AggregateId,
    aggregate_type: String,
    version: u64,
    name: Arc<str>,
    schema_version: u32,
    payload: Vec<u8>,
    metadata: Option<Vec<u8>>,
    event_id: uuid::Uuid,
    recorded_at: SystemTime,
}

#[derive(Default)]
struct State {
    aggregates: HashMap<AggregateId, AggregateRow>,
    keys: HashMap<(String, String), AggregateId>,
    /// The global feed; an event's position is its index + 1. A pruned or erased event leaves
    /// `None` in its place, so that positions stay as they were.
    events: Vec<Option<StoredEvent>>,
    /// Per aggregate, the indexes of its events in version order.
    streams: HashMap<AggregateId, Vec<usize>>,
    /// Per aggregate and snapshot shape, snapshots by version.
    snapshots: HashMap<(AggregateId, u32), BTreeMap<u64, Vec<u8>>>,
    event_ids: HashSet<uuid::Uuid>,
    /// Durable subscriptions by name and partition.
    subscriptions: BTreeMap<(String, u32), Row>,
    /// The heartbeats of subscription workers, by subscription and owner.
    workers: HashMap<(String, String), SystemTime>,
    /// Parked events, by subscription and aggregate.
    parked: BTreeMap<(String, AggregateId), Parked>,
    closed: bool,
}

pub(crate) struct MemoryBackend {
    state: Mutex<State>,
    committed: CommitSignal,
}

impl MemoryBackend {
    pub(crate) fn new(_options: &StoreOptions) -> Self {
        MemoryBackend {
            state: Mutex::new(State::default()),
            committed: CommitSignal::default(),
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, State>> {
        // A panic while the lock was held cannot leave the state half-written: commit checks
        // everything before it changes anything.
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.closed {
            return Err(Error::backend("the store is closed"));
        }
        Ok(state)
    }
}

impl State {
    /// Makes one subscription write; the error of [`Write::missed`] when it matched nothing.
    fn write(&mut self, write: &Write) -> Result<()> {
        let now = SystemTime::now();
        let matched = match write {
            Write::Leave { name, owner } => {
                self.workers.remove(&(name.clone(), owner.clone()));
                true
            }
            Write::Park { parked } => {
                self.parked
                    .insert((parked.name.clone(), parked.aggregate), parked.clone());
                true
            }
            Write::Unpark {
                name,
                aggregate,
                next,
            } => {
                let key = (name.clone(), *aggregate);
                match next {
                    Some(next) => {
                        if let Some(p) = self.parked.get_mut(&key) {
                            p.version = *next;
                            p.state = "retry".to_owned();
                        }
                    }
                    None => {
                        self.parked.remove(&key);
                    }
                }
                true
            }
            Write::MarkParked {
                name,
                event_id,
                state,
            } => {
                let found = self
                    .parked
                    .values_mut()
                    .find(|p| p.name == *name && p.event_id == *event_id);
                match found {
                    Some(p) => {
                        p.state = (*state).to_owned();
                        true
                    }
                    None => false,
                }
            }
            _ => {
                let mut matched = false;
                for row in self
                    .subscriptions
                    .values_mut()
                    .filter(|row| row.name == write.name())
                {
                    if let Some(lease) = write.lease()
                        && (row.partition != lease.partition
                            || row.owner.as_deref() != Some(lease.owner.as_str())
                            || row.token != lease.token)
                    {
                        continue;
                    }
                    if let Write::Checkpoint { from, .. } = write
                        && row.cursor != *from
                    {
                        continue;
                    }
                    matched = true;
                    apply_write(row, write, now);
                }
                matched
            }
        };
        match write.missed() {
            Some(error) if !matched => Err(error),
            _ => Ok(()),
        }
    }
}

/// The records `batch` will have once applied to `state`.
fn records_of(batch: &CommitBatch, state: &State) -> Result<Vec<RecordedEvent>> {
    let stored = state.events.len();
    batch
        .events_in_order()
        .into_iter()
        .enumerate()
        .map(|(i, (change, event))| {
            let position = (stored + i) as u64 + 1;
            Ok(RecordedEvent {
                cursor: FeedCursor::at_position(position),
                aggregate_id: change.id,
                aggregate_type: change.aggregate_type.to_owned(),
                key: match (&change.rekey, change.is_new) {
                    (Some(key), _) => key.clone(),
                    (None, true) => change.key.clone(),
                    (None, false) => state
                        .aggregates
                        .get(&change.id)
                        .and_then(|row| row.key.clone()),
                },
                version: event.version,
                event_type: event.name.to_owned(),
                schema_version: event.schema_version,
                payload: event.payload.clone(),
                event_id: event.event_id,
                recorded_at: batch.recorded_at,
                metadata: Metadata::decode(event.metadata.as_deref())
                    .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?,
            })
        })
        .collect()
}

/// Makes `write` on one subscription row it matched.
fn apply_write(row: &mut Row, write: &Write, now: SystemTime) {
    match write {
        Write::Checkpoint { lease, cursor, .. } => {
            row.cursor = *cursor;
            row.attempts = 0;
            row.last_error = None;
            row.error_cursor = None;
            row.lease_expires_at = Some(now + lease.duration);
        }
        Write::Fail {
            at,
            attempts,
            error,
            ..
        } => {
            row.state = "failed".to_owned();
            row.attempts = *attempts;
            row.last_error = Some(error.clone());
            row.error_cursor = Some(cursor_text(*at));
        }
        Write::Release { .. } => {
            row.owner = None;
            row.lease_expires_at = None;
        }
        Write::Renew { lease } => {
            row.lease_expires_at = Some(now + lease.duration);
        }
        Write::Leave { .. }
        | Write::Park { .. }
        | Write::Unpark { .. }
        | Write::MarkParked { .. } => {}
        Write::State { state, .. } => {
            row.state = (*state).to_owned();
            if *state == "active" {
                row.attempts = 0;
                row.last_error = None;
                row.error_cursor = None;
            }
        }
        Write::Reset {
            filter,
            start,
            cursor,
            ..
        } => {
            row.filter = filter.clone();
            row.start = start.clone();
            row.cursor = *cursor;
            row.state = "active".to_owned();
            row.attempts = 0;
            row.last_error = None;
            row.error_cursor = None;
            row.owner = None;
            row.lease_expires_at = None;
            row.token += 1;
        }
    }
}

impl State {
    fn find(&self, locate: Locate<'_>) -> Option<&AggregateRow> {
        let id = match locate {
            Locate::Id(id) => id,
            Locate::Key {
                aggregate_type,
                key,
            } => *self
                .keys
                .get(&(aggregate_type.to_owned(), key.to_owned()))?,
        };
        self.aggregates.get(&id)
    }

    /// True when `event` passes `filter`.
    fn matches(&self, filter: &Filter, event: &StoredEvent) -> bool {
        let types = filter.event_types();
        let aggregate_types = filter.aggregate_types();
        (types.is_empty() || types.iter().any(|t| **t == *event.name))
            && (aggregate_types.is_empty() || aggregate_types.contains(&event.aggregate_type))
            && filter
                .aggregate_id()
                .is_none_or(|id| id == event.aggregate_id)
            && filter.partition().is_none_or(|(partition, partitions)| {
                let last = event.aggregate_id.as_uuid().as_bytes()[15];
                u32::from(last) % partitions == partition
            })
            && filter.aggregate_key().is_none_or(|key| {
                self.aggregates
                    .get(&event.aggregate_id)
                    .is_some_and(|row| row.key.as_deref() == Some(key))
            })
    }

    fn record(&self, index: usize) -> Result<RecordedEvent> {
        let e = self
            .events
            .get(index)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Corrupt(format!("no event at index {index}")))?;
        let position = index as u64 + 1;
        Ok(RecordedEvent {
            cursor: FeedCursor::at_position(position),
            aggregate_id: e.aggregate_id,
            aggregate_type: e.aggregate_type.clone(),
            key: self
                .aggregates
                .get(&e.aggregate_id)
                .and_then(|row| row.key.clone()),
            version: e.version,
            event_type: e.name.to_string(),
            schema_version: e.schema_version,
            payload: e.payload.clone(),
            event_id: e.event_id,
            recorded_at: e.recorded_at,
            metadata: Metadata::decode(e.metadata.as_deref())
                .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?,
        })
    }

    /// Checks every change of a batch against the current state; writes nothing.
    fn check(&self, batch: &CommitBatch) -> Result<()> {
        let mut new_keys = HashSet::new();
        for change in &batch.changes {
            if change.is_new {
                if let Some(key) = &change.key {
                    let k = (change.aggregate_type.to_owned(), key.clone());
                    if self.keys.contains_key(&k) || !new_keys.insert(k) {
                        return Err(Error::KeyTaken {
                            aggregate_type: change.aggregate_type.to_owned(),
                            key: key.clone(),
                        });
                    }
                }
                if self.aggregates.contains_key(&change.id) {
                    return Err(Error::Conflict {
                        aggregate_type: change.aggregate_type.to_owned(),
                        aggregate: change.id,
                        expected: 0,
                        actual: self.aggregates.get(&change.id).map_or(0, |r| r.version),
                    });
                }
            } else {
                let actual = self.aggregates.get(&change.id).map_or(0, |r| r.version);
                if actual != change.expected {
                    return Err(Error::Conflict {
                        aggregate_type: change.aggregate_type.to_owned(),
                        aggregate: change.id,
                        expected: change.expected,
                        actual,
                    });
                }
            }
            if let Some(Some(key)) = &change.rekey {
                let k = (change.aggregate_type.to_owned(), key.clone());
                let held = self.keys.get(&k).is_some_and(|holder| {
                    // A holder that this batch moves off the key frees it.
                    *holder != change.id
                        && !batch
                            .changes
                            .iter()
                            .any(|c| c.id == *holder && c.rekey.is_some())
                });
                if held || !new_keys.insert(k) {
                    return Err(Error::KeyTaken {
                        aggregate_type: change.aggregate_type.to_owned(),
                        key: key.clone(),
                    });
                }
            }
            for event in &change.events {
                if self.event_ids.contains(&event.event_id) {
                    return Err(Error::Corrupt(format!(
                        "event id {} is already stored",
                        event.event_id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Deletes the events of aggregate `id` whose versions pass `doomed`; returns how many.
    fn delete_events(&mut self, id: AggregateId, doomed: impl Fn(u64) -> bool) -> u64 {
        let Some(indexes) = self.streams.get_mut(&id) else {
            return 0;
        };
        let mut deleted = 0;
        indexes.retain(|&index| {
            let slot = self.events.get_mut(index);
            let Some(slot) = slot.filter(|s| s.as_ref().is_some_and(|e| doomed(e.version))) else {
                return true;
            };
            if let Some(event) = slot.take() {
                self.event_ids.remove(&event.event_id);
            }
            deleted += 1;
            false
        });
        deleted
    }

    fn prune(&mut self, prune: Prune) -> u64 {
        match prune {
            Prune::Events {
                id,
                snapshot_version,
            } => {
                let newest = self
                    .snapshots
                    .get(&(id, snapshot_version))
                    .and_then(|s| s.keys().next_back().copied());
                match newest {
                    Some(newest) => self.delete_events(id, |version| version <= newest),
                    None => 0,
                }
            }
            Prune::Snapshots {
                id,
                snapshot_version,
                keep,
            } => {
                let kept = usize::try_from(keep.saturating_sub(1)).unwrap_or(usize::MAX);
                let Some(&cutoff) = self
                    .snapshots
                    .get(&(id, snapshot_version))
                    .and_then(|s| s.keys().rev().nth(kept))
                else {
                    return 0;
                };
                let mut deleted = 0;
                for ((of, _), snapshots) in self.snapshots.iter_mut() {
                    if *of == id {
                        let before = snapshots.len();
                        snapshots.retain(|version, _| *version >= cutoff);
                        deleted += (before - snapshots.len()) as u64;
                    }
                }
                deleted
            }
        }
    }

    fn apply(&mut self, batch: &CommitBatch) {
        for change in batch.changes.iter().filter(|c| c.erase) {
            self.delete_events(change.id, |version| version <= change.expected);
            self.snapshots.retain(|(of, _), _| *of != change.id);
            if let Some(row) = self.aggregates.get_mut(&change.id) {
                row.erased = true;
            }
        }
        for change in &batch.changes {
            let row = self
                .aggregates
                .entry(change.id)
                .or_insert_with(|| AggregateRow {
                    id: change.id,
                    aggregate_type: change.aggregate_type.to_owned(),
                    key: change.key.clone(),
                    version: 0,
                    erased: false,
                });
            row.version = change.new_version();
            if change.rekey.is_some()
                && let Some(old) = row.key.take()
            {
                let slot = (change.aggregate_type.to_owned(), old);
                if self.keys.get(&slot) == Some(&change.id) {
                    self.keys.remove(&slot);
                }
            }
        }
        // Keys after every release, so that two aggregates may swap keys in one commit.
        for change in &batch.changes {
            let (true, Some(key)) = (change.is_new || change.rekey.is_some(), &change.key) else {
                continue;
            };
            if let Some(row) = self.aggregates.get_mut(&change.id) {
                row.key = Some(key.clone());
            }
            self.keys
                .insert((change.aggregate_type.to_owned(), key.clone()), change.id);
        }
        for change in &batch.changes {
            if let Some(snapshot) = &change.snapshot {
                self.snapshots
                    .entry((change.id, snapshot.snapshot_version))
                    .or_default()
                    .insert(snapshot.version, snapshot.payload.clone());
            }
        }
        for (change, event) in batch.events_in_order() {
            self.streams
                .entry(change.id)
                .or_default()
                .push(self.events.len());
            self.event_ids.insert(event.event_id);
            self.events.push(Some(StoredEvent {
                aggregate_id: change.id,
                aggregate_type: change.aggregate_type.to_owned(),
                version: event.version,
                name: Arc::from(event.name),
                schema_version: event.schema_version,
                payload: event.payload.clone(),
                metadata: event.metadata.clone(),
                event_id: event.event_id,
                recorded_at: batch.recorded_at,
            }));
        }
    }
}

impl Backend for MemoryBackend {
    fn prepare<'a>(&'a self, _registry: &'a Registry) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn load<'a>(&'a self, request: LoadRequest<'a>) -> BoxFuture<'a, Result<Option<LoadedStream>>> {
        Box::pin(async move {
            // Like a real store, a load is a suspension point where other tasks run.
            tokio::task::yield_now().await;
            let state = self.state()?;
            let Some(row) = state.find(request.locate) else {
                return Ok(None);
            };
            let up_to = request.up_to.map_or(row.version, |v| v.min(row.version));
            let snapshot = request.snapshot_version.filter(|_| request.after.is_none());
            let snapshot = snapshot.and_then(|shape| {
                state
                    .snapshots
                    .get(&(row.id, shape))?
                    .range(..=up_to)
                    .next_back()
                    .map(|(version, payload)| StoredSnapshot {
                        version: *version,
                        payload: payload.clone(),
                    })
            });
            let from = request
                .after
                .unwrap_or_else(|| snapshot.as_ref().map_or(0, |s| s.version));
            let indexes = state.streams.get(&row.id).map_or(&[][..], Vec::as_slice);
            let mut events = Vec::new();
            let mut payloads = Vec::new();
            for &index in indexes {
                let Some(Some(e)) = state.events.get(index) else {
                    continue;
                };
                if e.version > from && e.version <= up_to {
                    let start = payloads.len();
                    payloads.extend_from_slice(&e.payload);
                    events.push(StreamEvent {
                        version: e.version,
                        position: index as u64 + 1,
                        name: e.name.clone(),
                        schema_version: e.schema_version,
                        payload: start..payloads.len(),
                    });
                }
            }
            Ok(Some(LoadedStream {
                row: row.clone(),
                snapshot,
                events,
                payloads,
            }))
        })
    }

    fn locate<'a>(&'a self, locate: Locate<'a>) -> BoxFuture<'a, Result<Option<AggregateRow>>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(self.state()?.find(locate).cloned())
        })
    }

    fn commit<'a>(&'a self, batch: &'a CommitBatch) -> BoxFuture<'a, Result<Vec<FeedCursor>>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            let mut state = self.state()?;
            let erasing;
            let batch = if batch.erases() {
                let current: Vec<_> = batch
                    .erased_ids()
                    .into_iter()
                    .filter_map(|id| {
                        let row = state.aggregates.get(&id)?;
                        Some((id, row.version, row.erased))
                    })
                    .collect();
                erasing = batch.erasing_at(&current)?;
                &erasing
            } else {
                batch
            };
            state.check(batch)?;
            let first = state.events.len() as u64 + 1;
            let cursors = if batch.cursors {
                (first..first + batch.event_count() as u64)
                    .map(FeedCursor::at_position)
                    .collect()
            } else {
                Vec::new()
            };
            if !batch.inline.is_empty() {
                // No SQL to run here, but a projection that fails fails the commit.
                let records = records_of(batch, &state)?;
                batch.inline.statements(&records)?;
            }
            state.apply(batch);
            drop(state);
            self.committed.notify();
            Ok(cursors)
        })
    }

    fn read_stream<'a>(
        &'a self,
        id: AggregateId,
        range: StreamRange,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>> {
        Box::pin(async move {
            let state = self.state()?;
            let indexes = state.streams.get(&id).map_or(&[][..], Vec::as_slice);
            let in_range = |index: &&usize| {
                state
                    .events
                    .get(**index)
                    .and_then(Option::as_ref)
                    .is_some_and(|e| range.contains(e.version))
            };
            let limit = usize::try_from(range.limit).unwrap_or(usize::MAX);
            let chosen: Vec<usize> = if range.backward {
                indexes
                    .iter()
                    .rev()
                    .filter(in_range)
                    .take(limit)
                    .copied()
                    .collect()
            } else {
                indexes
                    .iter()
                    .filter(in_range)
                    .take(limit)
                    .copied()
                    .collect()
            };
            chosen
                .into_iter()
                .map(|index| state.record(index))
                .collect()
        })
    }

    fn prune<'a>(&'a self, prune: Prune) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(self.state()?.prune(prune))
        })
    }

    fn find_events<'a>(
        &'a self,
        ids: &'a [uuid::Uuid],
    ) -> BoxFuture<'a, Result<Vec<(uuid::Uuid, AggregateId, u64)>>> {
        Box::pin(async move {
            let state = self.state()?;
            Ok(state
                .events
                .iter()
                .flatten()
                .filter(|e| ids.contains(&e.event_id))
                .map(|e| (e.event_id, e.aggregate_id, e.version))
                .collect())
        })
    }

    fn read_feed<'a>(&'a self, after: FeedCursor, limit: usize) -> BoxFuture<'a, Result<FeedPage>> {
        Box::pin(async move {
            let state = self.state()?;
            let start = usize::try_from(after.position).unwrap_or(usize::MAX);
            let events = (start..state.events.len())
                .filter(|&index| matches!(state.events.get(index), Some(Some(_))))
                .take(limit)
                .map(|index| state.record(index))
                .collect::<Result<_>>()?;
            Ok(FeedPage::new(events, None, after))
        })
    }

    fn read_feed_matching<'a>(
        &'a self,
        after: FeedCursor,
        limit: usize,
        filter: &'a Filter,
    ) -> BoxFuture<'a, Result<FeedPage>> {
        Box::pin(async move {
            let state = self.state()?;
            let start = usize::try_from(after.position).unwrap_or(usize::MAX);
            let mut events = Vec::new();
            let mut scanned = start.min(state.events.len());
            for (index, event) in state.events.iter().enumerate().skip(start) {
                if events.len() == limit {
                    break;
                }
                scanned = index + 1;
                if let Some(event) = event
                    && state.matches(filter, event)
                {
                    events.push(state.record(index)?);
                }
            }
            Ok(FeedPage::new(events, None, after)
                .scanned_to(FeedCursor::at_position(scanned as u64)))
        })
    }

    fn subscription_open<'a>(&'a self, spec: &'a Spec) -> BoxFuture<'a, Result<Row>> {
        Box::pin(async move {
            let mut state = self.state()?;
            for partition in 0..spec.partitions.max(1) {
                state
                    .subscriptions
                    .entry((spec.name.clone(), partition))
                    .or_insert_with(|| Row {
                        name: spec.name.clone(),
                        partition,
                        partitions: spec.partitions.max(1),
                        filter: spec.filter.clone(),
                        start: spec.start.clone(),
                        cursor: spec.initial,
                        owner: None,
                        token: 0,
                        lease_expires_at: None,
                        state: "active".to_owned(),
                        attempts: 0,
                        last_error: None,
                        error_cursor: None,
                    });
            }
            state
                .subscriptions
                .get(&(spec.name.clone(), 0))
                .cloned()
                .ok_or_else(|| Error::Corrupt("a subscription without partition 0".to_owned()))
        })
    }

    fn subscription_claim<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<Option<Row>>> {
        Box::pin(async move {
            let mut state = self.state()?;
            let now = SystemTime::now();
            let Some(row) = state
                .subscriptions
                .get_mut(&(claim.name.clone(), claim.partition))
            else {
                return Err(Error::SubscriptionNotFound {
                    name: claim.name.clone(),
                });
            };
            let ours = row.owner.as_deref() == Some(claim.owner.as_str());
            let free = row.owner.is_none() || row.lease_expires_at.is_none_or(|at| at <= now);
            if !ours && !free {
                return Ok(None);
            }
            if !ours {
                row.token += 1;
                row.owner = Some(claim.owner.clone());
            }
            row.lease_expires_at = Some(now + claim.lease);
            Ok(Some(row.clone()))
        })
    }

    fn subscription_heartbeat<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<u32>> {
        Box::pin(async move {
            let mut state = self.state()?;
            let now = SystemTime::now();
            state.workers.retain(|_, expires| *expires > now);
            state
                .workers
                .insert((claim.name.clone(), claim.owner.clone()), now + claim.lease);
            let live = state
                .workers
                .keys()
                .filter(|(name, _)| *name == claim.name)
                .count();
            Ok(u32::try_from(live).unwrap_or(u32::MAX))
        })
    }

    fn subscription_rows<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Row>>> {
        Box::pin(async move {
            let state = self.state()?;
            Ok(state
                .subscriptions
                .values()
                .filter(|row| name.is_none_or(|n| n == row.name))
                .cloned()
                .collect())
        })
    }

    fn begin_tx(&self) -> BoxFuture<'_, Result<TxState>> {
        Box::pin(async move {
            drop(self.state()?);
            Ok(TxState::Memory)
        })
    }

    fn parked<'a>(
        &'a self,
        name: &'a str,
        partition: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Parked>>> {
        Box::pin(async move {
            let state = self.state()?;
            Ok(state
                .parked
                .values()
                .filter(|p| p.name == name && partition.is_none_or(|n| n == p.partition))
                .cloned()
                .collect())
        })
    }

    fn commit_tx(&self, _tx: TxState, writes: Vec<Write>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut state = self.state()?;
            // All or nothing, as the SQL stores' transactions.
            let before = (state.subscriptions.clone(), state.parked.clone());
            for write in &writes {
                if let Err(e) = state.write(write) {
                    (state.subscriptions, state.parked) = before;
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    fn changes(&self) -> u64 {
        self.committed.count()
    }

    fn wait_for_change(&self, since: u64, max_wait: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.committed.wait(since, max_wait))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.closed = true;
        })
    }
}
