//! Rebuilding a root from what the store returned, and the snapshot a root is due after an
//! event.

use std::sync::Arc;

use crate::aggregate::{Aggregate, Handler, Root};
use crate::error::{Error, Result};
use crate::event::StoredPayload;
use crate::store::{AggregateRow, LoadedStream, StagedSnapshot};

/// Folds a loaded stream into a root, checking that versions follow each other with no gap.
pub(crate) fn rebuild<A: Aggregate>(stream: &LoadedStream) -> Result<Root<A>> {
    check_type::<A>(&stream.row)?;
    let (mut state, version) = match &stream.snapshot {
        Some(snapshot) => (
            A::decode_snapshot(&snapshot.payload, snapshot.version)?,
            snapshot.version,
        ),
        None => (A::default(), 0),
    };
    let version = apply_events(&mut state, version, stream)?;
    Ok(root(stream, version, state))
}

/// Folds the events of a stream read after a cached version into the cached state.
pub(crate) fn rebuild_from<A: Aggregate>(
    stream: &LoadedStream,
    version: u64,
    mut state: A,
) -> Result<Root<A>> {
    check_type::<A>(&stream.row)?;
    let version = apply_events(&mut state, version, stream)?;
    Ok(root(stream, version, state))
}

fn check_type<A: Aggregate>(row: &AggregateRow) -> Result<()> {
    if row.aggregate_type != A::NAME {
        return Err(Error::WrongAggregateType {
            aggregate: row.id,
            expected: A::NAME.to_owned(),
            found: row.aggregate_type.clone(),
        });
    }
    Ok(())
}

fn root<A>(stream: &LoadedStream, version: u64, state: A) -> Root<A> {
    Root {
        id: stream.row.id,
        key: stream.row.key.clone(),
        version,
        state,
    }
}

/// Applies the stream's events to `state`, at `version`, and returns the version reached. Each
/// event type's handler is looked up once per load: the names of a stream share their
/// allocation with the backend's type cache, so most events find theirs by pointer.
fn apply_events<A: Aggregate>(
    state: &mut A,
    mut version: u64,
    stream: &LoadedStream,
) -> Result<u64> {
    let mut handlers: Vec<(&Arc<str>, Handler<A>)> = Vec::new();
    // Events missing before the first one read were pruned (the only deletion that leaves an
    // aggregate loadable); a gap further on is damage.
    if let Some(first) = stream.events.first()
        && first.version > version + 1
    {
        return Err(Error::EventsPruned {
            aggregate: stream.row.id,
            from: version + 1,
            to: first.version - 1,
        });
    }
    for event in &stream.events {
        if event.version != version + 1 {
            return Err(Error::Corrupt(format!(
                "aggregate {} jumps from version {version} to {} at position {}",
                stream.row.id, event.version, event.position
            )));
        }
        let stored = StoredPayload {
            name: &event.name,
            schema_version: event.schema_version,
            payload: stream.payload(event)?,
            position: event.position,
        };
        let found = handlers
            .iter()
            .find(|(name, _)| Arc::ptr_eq(name, &event.name))
            .or_else(|| handlers.iter().find(|(name, _)| ***name == *event.name));
        let handler = match found {
            Some((_, handler)) => *handler,
            None => {
                let handler = A::handler(&event.name).ok_or_else(|| stored.unknown(A::NAME))?;
                handlers.push((&event.name, handler));
                handler
            }
        };
        handler(state, &stored)?;
        version = event.version;
    }
    Ok(version)
}

/// The snapshot to stage after `root` reached its current version, if the policy fires. A
/// state that does not encode is an error; a snapshot over the size limit is skipped, since
/// snapshots only speed up loading.
pub(crate) fn snapshot_due<A: Aggregate>(
    root: &Root<A>,
    max: usize,
) -> Result<Option<StagedSnapshot>> {
    let Some(every) = A::SNAPSHOT_EVERY else {
        return Ok(None);
    };
    if every == 0 || !root.version.is_multiple_of(every) {
        return Ok(None);
    }
    let Some(encoded) = root.state.encode_snapshot() else {
        return Ok(None);
    };
    let payload = encoded?;
    if payload.len() > max {
        tracing::warn!(
            aggregate = %root.id,
            size = payload.len(),
            max,
            "snapshot over the payload limit; not staged"
        );
        return Ok(None);
    }
    Ok(Some(StagedSnapshot {
        version: root.version,
        snapshot_version: A::SNAPSHOT_VERSION,
        payload,
    }))
}
