//! The in-memory store (`memory:`), for tests: the same semantics as the SQL stores, including
//! all-or-nothing commits and typed conflicts, kept in one process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::FeedPage;
use crate::metadata::Metadata;
use crate::registry::Registry;
use crate::store::{
    AggregateRow, Backend, BoxFuture, CommitBatch, CommitSignal, LoadRequest, LoadedStream, Locate,
    StoreOptions, StoredSnapshot, StreamEvent,
};

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
    /// The global feed; an event's position is its index + 1.
    events: Vec<StoredEvent>,
    /// Per aggregate, the indexes of its events in version order.
    streams: HashMap<AggregateId, Vec<usize>>,
    /// Per aggregate and snapshot shape, snapshots by version.
    snapshots: HashMap<(AggregateId, u32), BTreeMap<u64, Vec<u8>>>,
    event_ids: HashSet<uuid::Uuid>,
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

    fn record(&self, index: usize) -> Result<RecordedEvent> {
        let e = self
            .events
            .get(index)
            .ok_or_else(|| Error::Corrupt(format!("no event at index {index}")))?;
        let position = index as u64 + 1;
        Ok(RecordedEvent {
            cursor: FeedCursor::at_position(position),
            aggregate_id: e.aggregate_id,
            aggregate_type: e.aggregate_type.clone(),
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

    fn apply(&mut self, batch: &CommitBatch) {
        for change in &batch.changes {
            let row = self
                .aggregates
                .entry(change.id)
                .or_insert_with(|| AggregateRow {
                    id: change.id,
                    aggregate_type: change.aggregate_type.to_owned(),
                    key: change.key.clone(),
                    version: 0,
                });
            row.version = change.new_version();
            if let (true, Some(key)) = (change.is_new, &change.key) {
                self.keys
                    .insert((change.aggregate_type.to_owned(), key.clone()), change.id);
            }
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
            self.events.push(StoredEvent {
                aggregate_id: change.id,
                aggregate_type: change.aggregate_type.to_owned(),
                version: event.version,
                name: Arc::from(event.name),
                schema_version: event.schema_version,
                payload: event.payload.clone(),
                metadata: event.metadata.clone(),
                event_id: event.event_id,
                recorded_at: batch.recorded_at,
            });
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
                let Some(e) = state.events.get(index) else {
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

    fn commit<'a>(&'a self, batch: &'a CommitBatch) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            let mut state = self.state()?;
            state.check(batch)?;
            state.apply(batch);
            drop(state);
            self.committed.notify();
            Ok(())
        })
    }

    fn read_stream<'a>(
        &'a self,
        id: AggregateId,
        after_version: u64,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>> {
        Box::pin(async move {
            let state = self.state()?;
            let indexes = state.streams.get(&id).map_or(&[][..], Vec::as_slice);
            let start = usize::try_from(after_version).unwrap_or(usize::MAX);
            indexes
                .iter()
                .skip(start)
                .map(|&index| state.record(index))
                .collect()
        })
    }

    fn read_feed<'a>(&'a self, after: FeedCursor, limit: usize) -> BoxFuture<'a, Result<FeedPage>> {
        Box::pin(async move {
            let state = self.state()?;
            let start = usize::try_from(after.position).unwrap_or(usize::MAX);
            let end = start.saturating_add(limit).min(state.events.len());
            let events = (start..end)
                .map(|index| state.record(index))
                .collect::<Result<_>>()?;
            Ok(FeedPage::new(events, None))
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
