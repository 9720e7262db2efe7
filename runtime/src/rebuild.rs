//! Rebuilding a root from what the store returned, and the snapshot a root is due after an
//! event.

use crate::aggregate::{Aggregate, Root};
use crate::error::{Error, Result};
use crate::event::StoredPayload;
use crate::store::{LoadedStream, StagedSnapshot};

/// Folds a loaded stream into a root, checking that versions follow each other with no gap.
pub(crate) fn rebuild<A: Aggregate>(stream: &LoadedStream) -> Result<Root<A>> {
    let row = &stream.row;
    if row.aggregate_type != A::NAME {
        return Err(Error::WrongAggregateType {
            aggregate: row.id,
            expected: A::NAME.to_owned(),
            found: row.aggregate_type.clone(),
        });
    }
    let (mut state, mut version) = match &stream.snapshot {
        Some(snapshot) => (
            A::decode_snapshot(&snapshot.payload, snapshot.version)?,
            snapshot.version,
        ),
        None => (A::default(), 0),
    };
    for event in &stream.events {
        if event.version != version + 1 {
            return Err(Error::Corrupt(format!(
                "aggregate {} jumps from version {version} to {} at position {}",
                row.id, event.version, event.position
            )));
        }
        state.apply_stored(&StoredPayload {
            name: &event.name,
            schema_version: event.schema_version,
            payload: &event.payload,
            position: event.position,
        })?;
        version = event.version;
    }
    Ok(Root {
        id: row.id,
        key: row.key.clone(),
        version,
        state,
    })
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
